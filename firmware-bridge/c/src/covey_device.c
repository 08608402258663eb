/*
 * covey_device: the device side of the Covey firmware bridge protocol v1.
 * See covey_device.h for the API and PROTOCOL.md for the wire format.
 */
#include "covey_device.h"

#include <string.h>

enum {
    VERSION = 1,
    HEADER_LEN = 7,
    TAG_LEN = 16,
    MIN_FRAME = HEADER_LEN + TAG_LEN,
    FLAG_ACK = 0x01,
    T_HELLO = 0x01,
    T_WELCOME = 0x02,
    T_SUBSCRIBE = 0x03,
    T_UNSUBSCRIBE = 0x04,
    T_EVENT = 0x05,
    T_COMMAND = 0x06,
    T_CALL = 0x07,
    T_REPLY = 0x08,
    T_ACK = 0x09,
    T_PING = 0x0A,
    T_PONG = 0x0B,
    T_RESET = 0x0C,
    FEATURE_SEAL = 0x01,
    DIR_DEVICE = 'D',
    DIR_BRIDGE = 'B',
    RETRY_FIRST_MS = 200,
    RETRY_MAX_MS = 3000,
    HELLO_FIRST_MS = 500,
    HELLO_MAX_MS = 8000,
};

/* ---- HMAC (SHA-256 is in covey_sha256.c) ------------------------------ */

/* HMAC-SHA256(key, a | b | c) */
static void hmac3(const covey_device *d, const uint8_t *a, size_t an, const uint8_t *b, size_t bn,
                  const uint8_t *c, size_t cn, uint8_t out[32]) {
    covey_sha256 s = d->inner;
    covey_sha256_update(&s, a, an);
    covey_sha256_update(&s, b, bn);
    covey_sha256_update(&s, c, cn);
    covey_sha256_final(&s, out);
    s = d->outer;
    covey_sha256_update(&s, out, 32);
    covey_sha256_final(&s, out);
}

/* tag = HMAC-SHA256(key, dir | nonce | frame)[0..16] */
static void tag(const covey_device *d, uint8_t dir, const uint8_t nonce[8], const uint8_t *frame,
                size_t n, uint8_t out[TAG_LEN]) {
    uint8_t full[32];
    hmac3(d, &dir, 1, nonce, 8, frame, n, full);
    memcpy(out, full, TAG_LEN);
}

/* A sealed session's key for `dir`: HMAC-SHA256(key, "covey-seal" | dir |
   client nonce | session nonce). */
static void seal_key(const covey_device *d, uint8_t dir, uint8_t out[32]) {
    uint8_t label[11] = {'c', 'o', 'v', 'e', 'y', '-', 's', 'e', 'a', 'l', 0};
    label[10] = dir;
    hmac3(d, label, sizeof label, d->client_nonce, 8, d->nonce, 8, out);
}

/* A sealed frame's nonce: 0^8 | seq (the header's). */
static void seal_nonce(const uint8_t *f, uint8_t nonce[12]) {
    memset(nonce, 0, 8);
    memcpy(nonce + 8, f + 3, 4);
}

static int tag_ok(const covey_device *d, const uint8_t nonce[8], const uint8_t *f, size_t n) {
    uint8_t want[TAG_LEN], diff = 0;
    int i;
    tag(d, DIR_BRIDGE, nonce, f, n - TAG_LEN, want);
    for (i = 0; i < TAG_LEN; i++) diff |= (uint8_t)(want[i] ^ f[n - TAG_LEN + i]);
    return diff == 0;
}

/* ---- CRC-32 and COBS ------------------------------------------------ */

uint32_t covey_crc32(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--) {
        int k;
        c ^= *p++;
        for (k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return ~c;
}

size_t covey_cobs_encode(const uint8_t *in, size_t n, uint8_t *out) {
    size_t start = 0, o = 0;
    for (;;) {
        size_t run = 0;
        while (start + run < n && in[start + run] != 0 && run < 254) run++;
        out[o++] = (uint8_t)(run + 1);
        memcpy(out + o, in + start, run);
        o += run, start += run;
        if (start >= n) break;
        if (run < 254) start++; /* the zero this code stands for */
        else continue;
        if (start == n) { /* input ended with a zero: an empty last run */
            out[o++] = 1;
            break;
        }
    }
    return o;
}

int covey_cobs_decode(uint8_t *buf, size_t n) {
    size_t i = 0, o = 0;
    while (i < n) {
        uint8_t code = buf[i++];
        size_t k;
        if (code == 0 || i + code - 1 > n) return -1;
        for (k = 1; k < code; k++) buf[o++] = buf[i++];
        if (code != 0xFF && i < n) buf[o++] = 0;
    }
    return (int)o;
}

/* ---- frames ---------------------------------------------------------- */

static void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Write a frame to the transport: as is (datagram) or COBS(frame|CRC)|0. */
static int transmit(covey_device *d, uint8_t *f, size_t n) {
    if (!d->t.stream) return d->t.write(d->t.ctx, f, n) < 0 ? COVEY_EIO : COVEY_OK;
    {
        /* Stream: encode run by run straight from the frame, no second
           frame-sized buffer. The CRC goes through a small tail buffer. */
        uint8_t crc[4], code, zero = 0;
        uint32_t c = covey_crc32(f, n);
        size_t start = 0, total = n + 4;
        crc[0] = (uint8_t)c, crc[1] = (uint8_t)(c >> 8), crc[2] = (uint8_t)(c >> 16), crc[3] = (uint8_t)(c >> 24);
#define AT(i) ((i) < n ? f[i] : crc[(i) - n])
        for (;;) {
            size_t run = 0, k;
            while (start + run < total && AT(start + run) != 0 && run < 254) run++;
            code = (uint8_t)(run + 1);
            if (d->t.write(d->t.ctx, &code, 1) < 0) return COVEY_EIO;
            for (k = 0; k < run; k++) {
                uint8_t b = AT(start + k);
                if (d->t.write(d->t.ctx, &b, 1) < 0) return COVEY_EIO;
            }
            start += run;
            if (start >= total) break;
            if (run == 254) continue;
            start++;
            if (start == total) {
                code = 1;
                if (d->t.write(d->t.ctx, &code, 1) < 0) return COVEY_EIO;
                break;
            }
        }
#undef AT
        return d->t.write(d->t.ctx, &zero, 1) < 0 ? COVEY_EIO : COVEY_OK;
    }
}

/* Header into d->tx; returns the body offset. */
static size_t begin(covey_device *d, uint8_t type, uint8_t flags, uint32_t seq) {
    d->tx[0] = VERSION, d->tx[1] = type, d->tx[2] = flags;
    put32(d->tx + 3, seq);
    return HEADER_LEN;
}

static int put_str(covey_device *d, size_t *at, const char *s) {
    size_t n = strlen(s);
    if (n > 255 || *at + 1 + n + TAG_LEN > d->max_frame) return COVEY_ETOOBIG;
    d->tx[(*at)++] = (uint8_t)n;
    memcpy(d->tx + *at, s, n);
    *at += n;
    return COVEY_OK;
}

static int put_bytes(covey_device *d, size_t *at, const uint8_t *p, size_t n) {
    if (*at + n + TAG_LEN > d->max_frame) return COVEY_ETOOBIG;
    if (n) memcpy(d->tx + *at, p, n);
    *at += n;
    return COVEY_OK;
}

/* Tag (or, in a sealed session, seal) d->tx[0..n] and send it; a QoS 1
   frame is kept for retries. */
static int finish(covey_device *d, size_t n, const uint8_t nonce[8]) {
    uint8_t iv[12];
    if (d->sealed && d->tx[1] != T_HELLO) {
        seal_nonce(d->tx, iv);
        covey_aead_seal(d->seal_tx, iv, d->tx, HEADER_LEN, d->tx + HEADER_LEN, n - HEADER_LEN,
                        d->tx + n);
    } else {
        tag(d, DIR_DEVICE, nonce, d->tx, n, d->tx + n);
    }
    n += TAG_LEN;
    if (d->tx[2] & FLAG_ACK) {
        memcpy(d->pending, d->tx, n);
        d->pending_len = (uint16_t)n;
        d->pending_seq = get32(d->tx + 3);
        d->pending_tries = 1;
        d->pending_due = d->t.millis(d->t.ctx) + RETRY_FIRST_MS;
    }
    return transmit(d, d->tx, n);
}

static uint32_t next_seq(covey_device *d) {
    if (++d->out_seq == 0) d->out_seq = 1;
    return d->out_seq;
}

static void send_hello(covey_device *d) {
    static const uint8_t zero[8] = {0};
    size_t at = begin(d, T_HELLO, 0, 0);
    uint16_t mf = d->max_frame;
    d->t.random(d->t.ctx, d->client_nonce, 8);
    memcpy(d->tx + at, d->client_nonce, 8), at += 8;
    d->tx[at++] = (uint8_t)(COVEY_MAX_FRAME >> 8), d->tx[at++] = (uint8_t)(COVEY_MAX_FRAME & 0xFF);
    d->tx[at++] = (uint8_t)(d->ping_interval_s >> 8), d->tx[at++] = (uint8_t)(d->ping_interval_s & 0xFF);
    d->max_frame = COVEY_MAX_FRAME;
    put_str(d, &at, d->name);
    if (d->seal_offer) d->tx[at++] = FEATURE_SEAL;
    d->max_frame = mf;
    finish(d, at, zero);
    d->last_hello = d->t.millis(d->t.ctx);
}

static int send_simple(covey_device *d, uint8_t type, uint8_t flags, const char *a, const char *b,
                       const uint8_t *payload, size_t len) {
    size_t at;
    int rc;
    if (!d->connected) return COVEY_ENOTCONN;
    if ((flags & FLAG_ACK) && d->pending_len) return COVEY_EBUSY;
    at = begin(d, type, flags, next_seq(d));
    if ((rc = put_str(d, &at, a)) || (rc = put_str(d, &at, b)) || (rc = put_bytes(d, &at, payload, len))) {
        d->out_seq--;
        return rc;
    }
    rc = finish(d, at, d->nonce);
    return rc ? rc : (flags & FLAG_ACK) ? (int)d->pending_seq : COVEY_OK;
}

/* ---- API -------------------------------------------------------------- */

int covey_key_from_hex(uint8_t key[COVEY_KEY_LEN], const char *hex) {
    int i;
    if (strlen(hex) != 2 * COVEY_KEY_LEN) return COVEY_EINVAL;
    for (i = 0; i < 2 * COVEY_KEY_LEN; i++) {
        char c = hex[i];
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (v < 0) return COVEY_EINVAL;
        if (i % 2 == 0) key[i / 2] = (uint8_t)(v << 4);
        else key[i / 2] |= (uint8_t)v;
    }
    return COVEY_OK;
}

int covey_init(covey_device *d, const covey_transport *t, const char *name,
               const uint8_t key[COVEY_KEY_LEN]) {
    uint8_t pad[64];
    int i;
    size_t n = strlen(name);
    if (n == 0 || n > COVEY_NAME_MAX) return COVEY_EINVAL;
    memset(d, 0, sizeof *d);
    d->t = *t;
    memcpy(d->name, name, n + 1);
    for (i = 0; i < 64; i++) pad[i] = (uint8_t)((i < COVEY_KEY_LEN ? key[i] : 0) ^ 0x36);
    covey_sha256_init(&d->inner);
    covey_sha256_update(&d->inner, pad, 64);
    for (i = 0; i < 64; i++) pad[i] = (uint8_t)((i < COVEY_KEY_LEN ? key[i] : 0) ^ 0x5c);
    covey_sha256_init(&d->outer);
    covey_sha256_update(&d->outer, pad, 64);
    d->max_frame = 512 < COVEY_MAX_FRAME ? 512 : COVEY_MAX_FRAME;
    d->hello_gap = 0; /* first poll says hello at once */
    d->ping_interval_s = COVEY_PING_INTERVAL_S;
    d->seal_offer = 1;
    return COVEY_OK;
}

void covey_on_event(covey_device *d, covey_message_fn fn) { d->on_event = fn; }
void covey_on_command(covey_device *d, covey_message_fn fn) { d->on_command = fn; }
void covey_on_call(covey_device *d, covey_call_fn fn) { d->on_call = fn; }
void covey_on_ack(covey_device *d, covey_ack_fn fn) { d->on_ack = fn; }
void covey_set_user(covey_device *d, void *user) { d->user = user; }
void covey_set_ping_interval(covey_device *d, uint16_t s) { d->ping_interval_s = s ? s : 1; }
void covey_set_sealing(covey_device *d, int on) { d->seal_offer = on != 0; }
int covey_sealed(const covey_device *d) { return d->connected && d->sealed; }
int covey_connected(const covey_device *d) { return d->connected; }
int covey_busy(const covey_device *d) { return d->pending_len != 0 || d->resub < d->nsubs; }

int covey_subscribe(covey_device *d, const char *from, const char *name) {
    covey_sub *s;
    if (d->nsubs >= COVEY_MAX_SUBS || strlen(from) >= COVEY_MAX_PATTERN || strlen(name) >= COVEY_MAX_PATTERN)
        return COVEY_EINVAL;
    s = &d->subs[d->nsubs++];
    strcpy(s->from, from);
    strcpy(s->name, name);
    return COVEY_OK; /* sent (acked, in order) by covey_poll */
}

int covey_emit(covey_device *d, const char *name, const uint8_t *payload, size_t len, int qos) {
    if (d->resub < d->nsubs) return d->connected ? COVEY_EBUSY : COVEY_ENOTCONN;
    return send_simple(d, T_EVENT, qos ? FLAG_ACK : 0, "", name, payload, len);
}

int covey_send(covey_device *d, const char *target, const char *name, const uint8_t *payload,
               size_t len, int qos) {
    if (d->resub < d->nsubs) return d->connected ? COVEY_EBUSY : COVEY_ENOTCONN;
    return send_simple(d, T_COMMAND, qos ? FLAG_ACK : 0, target, name, payload, len);
}

/* ---- receiving ---------------------------------------------------------- */

/* Copy a str8 at f[*at] into out (NUL-terminated); 0 or -1. */
static int get_str(const uint8_t *f, size_t end, size_t *at, char *out, size_t cap) {
    size_t n;
    if (*at >= end) return -1;
    n = f[(*at)++];
    if (*at + n > end || n >= cap) return -1;
    memcpy(out, f + *at, n);
    out[n] = 0;
    *at += n;
    return 0;
}

static void on_welcome(covey_device *d, const uint8_t *f, size_t end) {
    size_t at = HEADER_LEN;
    char node[COVEY_NAME_MAX + 1];
    uint16_t mf;
    if (end - at < 20 || memcmp(f + at, d->client_nonce, 8) != 0) return; /* not for our hello */
    /* The welcome is tagged with the nonce it announces. */
    if (!tag_ok(d, f + at + 8, f, end + TAG_LEN)) {
        d->bad_tag++;
        return;
    }
    mf = (uint16_t)(f[at + 16] << 8 | f[at + 17]);
    at += 20;
    if (get_str(f, end, &at, node, sizeof node)) return;
    memcpy(d->nonce, f + HEADER_LEN + 8, 8);
    /* Sealed if both sides said so (the features byte is under the tag). */
    d->sealed = d->seal_offer && at < end && (f[at] & FEATURE_SEAL);
    if (d->sealed) seal_key(d, DIR_DEVICE, d->seal_tx), seal_key(d, DIR_BRIDGE, d->seal_rx);
    memcpy(d->node, node, sizeof node);
    d->max_frame = mf < COVEY_MAX_FRAME ? mf : COVEY_MAX_FRAME;
    d->connected = 1;
    d->sessions++;
    d->out_seq = 0;
    d->in_highest = 0, d->in_seen = 0;
    d->pending_len = 0; /* a frame of the old session is not retried */
    d->resub = 0;       /* subscriptions go again, in order */
    d->hello_gap = HELLO_FIRST_MS;
    d->last_rx = d->t.millis(d->t.ctx);
    /* The session is the bridge's pending one until a frame tagged with
       its nonce arrives: confirm it at once with a ping. */
    d->last_ping = d->last_rx - 1000u * d->ping_interval_s;
}

/* The replay window for the bridge's frames: 32 below the highest. */
static int fresh(covey_device *d, uint32_t seq) {
    if (seq == 0) return 0;
    if (seq > d->in_highest) {
        uint32_t shift = seq - d->in_highest;
        d->in_seen = shift >= 32 ? 0 : d->in_seen << shift;
        d->in_seen |= 1, d->in_highest = seq;
        return 1;
    }
    if (d->in_highest - seq >= 32 || (d->in_seen >> (d->in_highest - seq)) & 1) return 0;
    d->in_seen |= 1u << (d->in_highest - seq);
    return 1;
}

static void on_call(covey_device *d, const uint8_t *f, size_t at, size_t end) {
    char from[COVEY_MAX_NAME], name[COVEY_MAX_NAME];
    uint32_t id;
    int n;
    size_t hdr, room;
    if (end - at < 4) return;
    id = get32(f + at), at += 4;
    if (get_str(f, end, &at, from, sizeof from) || get_str(f, end, &at, name, sizeof name)) return;
    /* The reply is written straight into the transmit buffer, after its
       header; the request (in the receive buffer) stays readable. */
    hdr = begin(d, T_REPLY, 0, next_seq(d));
    put32(d->tx + hdr, id);
    hdr += 5;
    room = d->max_frame - hdr - TAG_LEN;
    if (d->on_call) {
        n = d->on_call(d->user, from, name, f + at, end - at, d->tx + hdr, room);
    } else {
        static const char msg[] = "no call handler on this device";
        n = (int)(sizeof msg - 1 < room ? sizeof msg - 1 : room);
        memcpy(d->tx + hdr, msg, (size_t)n);
        d->tx[hdr - 1] = 1;
        finish(d, hdr + (size_t)n, d->nonce);
        return;
    }
    d->tx[hdr - 1] = n < 0 ? 1 : 0;
    if (n < 0) { /* the error text, NUL-terminated within the room */
        n = 0;
        while ((size_t)n < room && d->tx[hdr + (size_t)n]) n++;
    }
    if ((size_t)n > room) n = (int)room;
    finish(d, hdr + (size_t)n, d->nonce);
}

static void on_message(covey_device *d, const uint8_t *f, size_t at, size_t end, covey_message_fn fn) {
    char from[COVEY_MAX_NAME], name[COVEY_MAX_NAME];
    if (get_str(f, end, &at, from, sizeof from) || get_str(f, end, &at, name, sizeof name)) {
        d->malformed++;
        return;
    }
    if (fn) fn(d->user, from, name, f + at, end - at);
}

static void on_ack(covey_device *d, const uint8_t *f, size_t at, size_t end) {
    uint32_t seq;
    uint8_t status;
    if (end - at != 5) return;
    seq = get32(f + at), status = f[at + 4];
    if (!d->pending_len || seq != d->pending_seq) return;
    if (status == 3 /* rate-limited */) { /* keep it: the retry timer resends */
        return;
    }
    d->pending_len = 0;
    if (d->pending[1] == T_SUBSCRIBE) d->resub++;
    else if (d->on_ack) d->on_ack(d->user, seq, status);
}

static void handle(covey_device *d, uint8_t *f, size_t n) {
    size_t end;
    if (n < MIN_FRAME || n > COVEY_MAX_FRAME || f[0] != VERSION) return;
    end = n - TAG_LEN;
    if (f[1] == T_RESET) {
        /* Unauthenticated by design: only ever prompts a new hello. */
        if (d->t.millis(d->t.ctx) - d->last_hello >= 1000) send_hello(d);
        return;
    }
    if (f[1] == T_WELCOME) {
        on_welcome(d, f, end);
        return;
    }
    if (!d->connected) return;
    if (d->sealed) {
        uint8_t iv[12];
        seal_nonce(f, iv);
        if (covey_aead_open(d->seal_rx, iv, f, HEADER_LEN, f + HEADER_LEN, end - HEADER_LEN, f + end)) {
            d->bad_tag++;
            return;
        }
    } else if (!tag_ok(d, d->nonce, f, n)) {
        d->bad_tag++;
        return;
    }
    if (!fresh(d, get32(f + 3))) {
        d->replayed++;
        return;
    }
    d->last_rx = d->t.millis(d->t.ctx);
    switch (f[1]) {
    case T_EVENT: on_message(d, f, HEADER_LEN, end, d->on_event); break;
    case T_COMMAND: on_message(d, f, HEADER_LEN, end, d->on_command); break;
    case T_CALL: on_call(d, f, HEADER_LEN, end); break;
    case T_ACK: on_ack(d, f, HEADER_LEN, end); break;
    case T_PONG: break;
    default: d->malformed++; break;
    }
}

static void read_all(covey_device *d) {
    int budget = 64; /* frames per poll: the rest of the loop gets a turn */
    while (budget-- > 0) {
        int n;
        if (!d->t.stream) {
            n = d->t.read(d->t.ctx, d->rx, sizeof d->rx);
            if (n <= 0) return;
            handle(d, d->rx, (size_t)n);
            continue;
        }
        {
            uint8_t b;
            n = d->t.read(d->t.ctx, &b, 1);
            if (n <= 0) return;
            if (b != 0) {
                if (d->rx_len < sizeof d->rx) d->rx[d->rx_len++] = b;
                else d->rx_overflow = 1;
                budget++; /* bytes are not frames */
                continue;
            }
            if (d->rx_len && !d->rx_overflow) {
                int m = covey_cobs_decode(d->rx, d->rx_len);
                if (m >= 4) {
                    uint32_t crc = covey_crc32(d->rx, (size_t)m - 4);
                    const uint8_t *c = d->rx + m - 4;
                    if (crc == ((uint32_t)c[0] | (uint32_t)c[1] << 8 | (uint32_t)c[2] << 16 | (uint32_t)c[3] << 24))
                        handle(d, d->rx, (size_t)m - 4);
                    else
                        d->bad_crc++;
                } else {
                    d->bad_crc++;
                }
            }
            d->rx_len = 0, d->rx_overflow = 0;
        }
    }
}

void covey_poll(covey_device *d) {
    uint32_t now;
    read_all(d);
    now = d->t.millis(d->t.ctx);
    if (!d->connected) {
        if (now - d->last_hello >= d->hello_gap) {
            send_hello(d);
            d->hello_gap = d->hello_gap ? d->hello_gap * 2 : HELLO_FIRST_MS;
            if (d->hello_gap > HELLO_MAX_MS) d->hello_gap = HELLO_MAX_MS;
        }
        return;
    }
    /* The bridge went silent for three pings (it restarted, or the
       device's network moved): start over with a hello. */
    if (now - d->last_rx > 3000u * d->ping_interval_s) {
        d->connected = 0;
        d->hello_gap = 0;
        return;
    }
    if (d->pending_len && (int32_t)(now - d->pending_due) >= 0) {
        if (d->pending_tries >= COVEY_RETRIES) {
            uint32_t seq = d->pending_seq;
            int sub = d->pending[1] == T_SUBSCRIBE;
            d->pending_len = 0;
            if (sub) d->resub++; /* give up on it, keep going */
            else if (d->on_ack) d->on_ack(d->user, seq, -1);
        } else {
            transmit(d, d->pending, d->pending_len);
            uint32_t gap = d->pending_tries < 5 ? (uint32_t)RETRY_FIRST_MS << d->pending_tries : RETRY_MAX_MS;
            d->pending_due = now + (gap < RETRY_MAX_MS ? gap : RETRY_MAX_MS);
            d->pending_tries++;
        }
    }
    if (!d->pending_len && d->resub < d->nsubs) {
        size_t at = begin(d, T_SUBSCRIBE, FLAG_ACK, next_seq(d));
        put_str(d, &at, d->subs[d->resub].from);
        put_str(d, &at, d->subs[d->resub].name);
        finish(d, at, d->nonce);
    }
    if (now - d->last_ping >= 1000u * d->ping_interval_s) {
        size_t at = begin(d, T_PING, 0, next_seq(d));
        finish(d, at, d->nonce);
        d->last_ping = now;
    }
}
