/*
 * covey-device: a device simulator on POSIX, built from the same library a
 * microcontroller uses. Test a node without hardware:
 *
 *   covey-device --udp HOST:PORT | --serial PATH[@BAUD]  --name NAME
 *                [--key HEX] [--qos 0|1] [--count N] [--drop PERCENT]
 *                [--ping SECONDS] [--wait-ms MS] [--seal 0|1]
 *                emit EVENT PAYLOAD | send TARGET NAME PAYLOAD |
 *                listen PATTERN | serve | rtt | selftest
 *
 * `rtt` (a benchmark): --count times, emit `ping` and wait for the command
 * `pong` a script sends back; prints `rtt n=N lost=L p50_us=X p99_us=Y`.
 *
 * The key comes from --key or the COVEY_DEVICE_KEY environment variable
 * (better: it stays out of `ps`). Output, one line each, for scripts:
 *   connected NODE (at every new session, then `mode sealed` or `mode tagged`) |
 *   event FROM NAME PAYLOAD | command FROM NAME PAYLOAD |
 *   call FROM NAME PAYLOAD | acked N/M
 * `serve` answers calls with the payload (a call named `fail` gets an
 * error); `listen` does too, and subscribes to events named PATTERN.
 */
#define _DEFAULT_SOURCE
#include "covey_device.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static int fd = -1;
static unsigned drop_percent;
static unsigned long sent, acked_ok, acked_bad;
static uint32_t lcg = 12345;
static int quiet;
static volatile int pongs;

static int dropped(void) {
    if (!drop_percent) return 0;
    lcg = lcg * 1103515245u + 12345u;
    return (lcg >> 16) % 100 < drop_percent;
}

static int io_write(void *ctx, const uint8_t *buf, size_t len) {
    (void)ctx;
    if (dropped()) return (int)len; /* lost on the way */
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd p = {fd, POLLOUT, 0};
            poll(&p, 1, 100);
            continue;
        }
        if (n < 0) return -1;
        buf += n, len -= (size_t)n;
    }
    return 0;
}

static int io_read(void *ctx, uint8_t *buf, size_t cap) {
    ssize_t n;
    (void)ctx;
    for (;;) {
        n = read(fd, buf, cap);
        if (n < 0) return (errno == EAGAIN || errno == EINTR || errno == ECONNREFUSED) ? 0 : -1;
        /* Datagrams are dropped whole; on a stream, loss is modelled on
           the write side only (a dropped byte would be line noise). */
        if (n > 0 && cap > 1 && dropped()) continue;
        return (int)n;
    }
}

static uint32_t io_millis(void *ctx) {
    struct timespec ts;
    (void)ctx;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)(ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
}

static void io_random(void *ctx, uint8_t *buf, size_t len) {
    int r = open("/dev/urandom", O_RDONLY);
    (void)ctx;
    if (r < 0 || read(r, buf, len) != (ssize_t)len) {
        fprintf(stderr, "covey-device: no /dev/urandom\n");
        exit(2);
    }
    close(r);
}

static void print_payload(const uint8_t *p, size_t n) {
    fwrite(p, 1, n, stdout);
    putchar('\n');
    fflush(stdout);
}

static void on_event(void *u, const char *from, const char *name, const uint8_t *p, size_t n) {
    (void)u;
    printf("event %s %s ", from, name);
    print_payload(p, n);
}

static void on_command(void *u, const char *from, const char *name, const uint8_t *p, size_t n) {
    (void)u;
    if (!strcmp(name, "pong")) pongs++;
    if (quiet) return;
    printf("command %s %s ", from, name);
    print_payload(p, n);
}

static int on_call(void *u, const char *from, const char *name, const uint8_t *p, size_t n,
                   uint8_t *reply, size_t cap) {
    (void)u;
    printf("call %s %s ", from, name);
    print_payload(p, n);
    if (strcmp(name, "fail") == 0) {
        snprintf((char *)reply, cap, "asked to fail");
        return -1;
    }
    if (n > cap) n = cap;
    memcpy(reply, p, n);
    return (int)n;
}

static void on_ack(void *u, uint32_t seq, int status) {
    (void)u, (void)seq;
    if (status == 0) acked_ok++;
    else {
        acked_bad++;
        fprintf(stderr, "covey-device: frame %u refused or lost (status %d)\n", seq, status);
    }
}

static int open_udp(const char *spec) {
    char host[256];
    const char *colon = strrchr(spec, ':');
    struct addrinfo hints, *res;
    int s;
    if (!colon || (size_t)(colon - spec) >= sizeof host) return -1;
    memcpy(host, spec, (size_t)(colon - spec));
    host[colon - spec] = 0;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_DGRAM;
    if (getaddrinfo(host, colon + 1, &hints, &res) != 0) return -1;
    s = socket(res->ai_family, SOCK_DGRAM, 0);
    if (s < 0 || connect(s, res->ai_addr, res->ai_addrlen) < 0) return -1;
    freeaddrinfo(res);
    fcntl(s, F_SETFL, O_NONBLOCK);
    return s;
}

static speed_t baud_const(long baud) {
    switch (baud) {
    case 9600: return B9600;
    case 19200: return B19200;
    case 38400: return B38400;
    case 57600: return B57600;
    case 230400: return B230400;
    case 460800: return B460800;
    case 921600: return B921600;
    default: return B115200;
    }
}

static int open_serial(const char *spec) {
    char path[256];
    const char *at = strrchr(spec, '@');
    long baud = at ? atol(at + 1) : 115200;
    size_t n = at ? (size_t)(at - spec) : strlen(spec);
    struct termios t;
    int s;
    if (n >= sizeof path) return -1;
    memcpy(path, spec, n);
    path[n] = 0;
    s = open(path, O_RDWR | O_NOCTTY | O_NONBLOCK);
    if (s < 0) return -1;
    if (tcgetattr(s, &t) == 0) {
        cfmakeraw(&t);
        cfsetspeed(&t, baud_const(baud));
        tcsetattr(s, TCSANOW, &t);
    }
    return s;
}

/* RFC 8439 §2.8.2: ChaCha20-Poly1305 seals the sunscreen text to the
   published ciphertext and tag, opens it back, and refuses a flipped bit. */
static int aead_vector(void) {
    static const char plain[] = "Ladies and Gentlemen of the class of '99: If I could offer you only "
                                "one tip for the future, sunscreen would be it.";
    static const uint8_t aad[12] = {0x50, 0x51, 0x52, 0x53, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7};
    static const uint8_t nonce[12] = {0x07, 0, 0, 0, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47};
    static const uint8_t ct_head[16] = {0xd3, 0x1a, 0x8d, 0x34, 0x64, 0x8e, 0x60, 0xdb,
                                        0x7b, 0x86, 0xaf, 0xbc, 0x53, 0xef, 0x7e, 0xc2};
    static const uint8_t ct_tail[2] = {0x61, 0x16};
    static const uint8_t want_tag[16] = {0x1a, 0xe1, 0x0b, 0x59, 0x4f, 0x09, 0xe2, 0x6a,
                                         0x7e, 0x90, 0x2e, 0xcb, 0xd0, 0x60, 0x06, 0x91};
    uint8_t key[32], buf[sizeof plain - 1], tag[16];
    size_t n = sizeof buf;
    int i, bad = 0;
    for (i = 0; i < 32; i++) key[i] = (uint8_t)(0x80 + i);
    memcpy(buf, plain, n);
    covey_aead_seal(key, nonce, aad, sizeof aad, buf, n, tag);
    if (memcmp(buf, ct_head, 16) || memcmp(buf + n - 2, ct_tail, 2)) bad = 1, fprintf(stderr, "aead: ciphertext\n");
    if (memcmp(tag, want_tag, 16)) bad = 1, fprintf(stderr, "aead: tag\n");
    if (covey_aead_open(key, nonce, aad, sizeof aad, buf, n, tag) || memcmp(buf, plain, n))
        bad = 1, fprintf(stderr, "aead: open\n");
    covey_aead_seal(key, nonce, aad, sizeof aad, buf, n, tag);
    buf[5] ^= 1;
    if (!covey_aead_open(key, nonce, aad, sizeof aad, buf, n, tag)) bad = 1, fprintf(stderr, "aead: forgery\n");
    return bad;
}

static int selftest(void) {
    /* FIPS 180-2 vectors: one block and two blocks. */
    static const char *msg[2] = {"abc", "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"};
    static const char *want[2] = {
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"};
    int i, k, bad = 0;
    for (i = 0; i < 2; i++) {
        covey_sha256 s;
        uint8_t out[32];
        char hex[65];
        covey_sha256_init(&s);
        covey_sha256_update(&s, (const uint8_t *)msg[i], strlen(msg[i]));
        covey_sha256_final(&s, out);
        for (k = 0; k < 32; k++) sprintf(hex + 2 * k, "%02x", out[k]);
        if (strcmp(hex, want[i]) != 0) bad = 1, fprintf(stderr, "sha256 vector %d: %s\n", i, hex);
    }
    if (covey_crc32((const uint8_t *)"123456789", 9) != 0xCBF43926u) bad = 1, fprintf(stderr, "crc32\n");
    bad |= aead_vector();
    puts(bad ? "selftest FAILED" : "selftest ok");
    return bad;
}

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Round trips device -> script -> device, after the session is up. */
static int rtt(covey_device *d, unsigned long count) {
    uint64_t *us = calloc(count ? count : 1, sizeof *us);
    unsigned long i, got = 0, lost = 0;
    quiet = 1;
    for (i = 0; i < count; i++) {
        int before = pongs;
        uint64_t t0 = now_us();
        if (covey_emit(d, "ping", (const uint8_t *)"x", 1, 0) < 0) return 1;
        while (pongs == before && now_us() - t0 < 1000000u) {
            struct pollfd p = {fd, POLLIN, 0};
            poll(&p, 1, 1);
            covey_poll(d);
        }
        if (pongs == before) lost++;
        else us[got++] = now_us() - t0;
    }
    qsort(us, got, sizeof *us, cmp_u64);
    printf("rtt n=%lu lost=%lu p50_us=%llu p99_us=%llu\n", got, lost,
           got ? (unsigned long long)us[got / 2] : 0ULL,
           got ? (unsigned long long)us[got * 99 / 100] : 0ULL);
    free(us);
    return lost > count / 100;
}

static void usage(void) {
    fprintf(stderr,
            "usage: covey-device (--udp HOST:PORT | --serial PATH[@BAUD]) --name NAME [--key HEX]\n"
            "                    [--qos 0|1] [--count N] [--drop PERCENT] [--ping S] [--wait-ms MS] [--seal 0|1]\n"
            "                    emit EVENT PAYLOAD | send TARGET NAME PAYLOAD | listen PATTERN | serve | rtt\n"
            "       covey-device selftest\n");
    exit(2);
}

static void poll_once(covey_device *d, int wait_ms) {
    struct pollfd p = {fd, POLLIN, 0};
    poll(&p, 1, wait_ms);
    covey_poll(d);
}

int main(int argc, char **argv) {
    const char *udp = NULL, *serial = NULL, *name = NULL, *key_hex = getenv("COVEY_DEVICE_KEY");
    int qos = 0, i;
    unsigned long count = 1;
    covey_transport t;
    static covey_device d;
    uint8_t key[COVEY_KEY_LEN];
    uint32_t start, wait_ms = 15000;
    unsigned ping = 0;
    int seal = 1;

    for (i = 1; i < argc && argv[i][0] == '-'; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        if (!strcmp(a, "--udp")) udp = argv[++i];
        else if (!strcmp(a, "--serial")) serial = argv[++i];
        else if (!strcmp(a, "--name")) name = argv[++i];
        else if (!strcmp(a, "--key")) key_hex = argv[++i];
        else if (!strcmp(a, "--qos")) qos = atoi(argv[++i]);
        else if (!strcmp(a, "--count")) count = strtoul(argv[++i], NULL, 10);
        else if (!strcmp(a, "--drop")) drop_percent = (unsigned)atoi(argv[++i]);
        else if (!strcmp(a, "--ping")) ping = (unsigned)atoi(argv[++i]);
        else if (!strcmp(a, "--wait-ms")) wait_ms = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (!strcmp(a, "--seal")) seal = atoi(argv[++i]);
        else usage();
    }
    if (i < argc && !strcmp(argv[i], "selftest")) return selftest();
    if (i >= argc || !name || !key_hex || (!udp == !serial)) usage();
    if (covey_key_from_hex(key, key_hex)) {
        fprintf(stderr, "covey-device: the key must be 64 hex digits (as `covey device add` prints it)\n");
        return 2;
    }
    fd = udp ? open_udp(udp) : open_serial(serial);
    if (fd < 0) {
        fprintf(stderr, "covey-device: cannot open %s: %s\n", udp ? udp : serial, strerror(errno));
        return 2;
    }
    lcg ^= (uint32_t)getpid();
    t.write = io_write, t.read = io_read, t.millis = io_millis, t.random = io_random;
    t.ctx = NULL, t.stream = serial != NULL;
    if (covey_init(&d, &t, name, key)) usage();
    covey_on_event(&d, on_event);
    covey_on_command(&d, on_command);
    covey_on_call(&d, on_call);
    covey_on_ack(&d, on_ack);
    if (ping) covey_set_ping_interval(&d, (uint16_t)ping);
    covey_set_sealing(&d, seal);

    if (!strcmp(argv[i], "listen") && i + 1 < argc) covey_subscribe(&d, "*", argv[i + 1]);
    start = io_millis(NULL);
    for (;;) {
        uint32_t was = d.sessions;
        poll_once(&d, 5);
        if (d.sessions != was) { /* a new session (the first, or after a reset) */
            printf("connected %s\nmode %s\n", d.node, covey_sealed(&d) ? "sealed" : "tagged");
            fflush(stdout);
            if (!strcmp(argv[i], "rtt")) return rtt(&d, count);
            if (strcmp(argv[i], "emit") && strcmp(argv[i], "send")) continue;
            break;
        }
        if (!covey_connected(&d) && io_millis(NULL) - start > wait_ms &&
            (!strcmp(argv[i], "emit") || !strcmp(argv[i], "send") || !strcmp(argv[i], "rtt"))) {
            fprintf(stderr, "covey-device: no welcome from the bridge (unknown device or wrong key?)\n");
            return 1;
        }
    }
    /* emit / send: `count` times, then wait for the acks (QoS 1). */
    {
        int is_send = !strcmp(argv[i], "send");
        const char *target = is_send ? argv[i + 1] : NULL;
        const char *ev = argv[i + 1 + is_send];
        const char *payload = i + 2 + is_send < argc ? argv[i + 2 + is_send] : "";
        if (i + 1 + is_send >= argc) usage();
        while (sent < count) {
            int rc = is_send ? covey_send(&d, target, ev, (const uint8_t *)payload, strlen(payload), qos)
                             : covey_emit(&d, ev, (const uint8_t *)payload, strlen(payload), qos);
            if (rc == COVEY_EBUSY || rc == COVEY_ENOTCONN) {
                poll_once(&d, 1);
                continue;
            }
            if (rc < 0) {
                fprintf(stderr, "covey-device: send failed (%d)\n", rc);
                return 1;
            }
            sent++;
            if (qos == 0 && sent % 64 == 0) covey_poll(&d);
        }
        while (qos && covey_busy(&d)) poll_once(&d, 5);
        /* A moment for the last QoS 0 datagrams to leave. */
        poll_once(&d, 20);
        if (qos) {
            printf("acked %lu/%lu\n", acked_ok, sent);
            return acked_ok == sent ? 0 : 1;
        }
        printf("sent %lu\n", sent);
        return 0;
    }
}
