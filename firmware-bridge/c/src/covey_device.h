/*
 * covey_device: a microcontroller on the Covey bus (protocol v1, see
 * PROTOCOL.md). C99, no malloc, no dependencies: SHA-256/HMAC, COBS and
 * CRC-32 are bundled. Fixed buffers are sized by the macros below; set
 * them before including this header (or with -D) to trade RAM for frame
 * size. With the defaults (512-byte frames, 8 subscriptions) a
 * covey_device takes 2,552 bytes of RAM on 32-bit ARM; with the AVR sizes
 * below (128-byte frames), 952.
 *
 * The transport is passed in as callbacks: a datagram transport (UDP)
 * sends and receives whole frames; a stream transport (a serial line)
 * carries them COBS-delimited with a CRC. Call covey_poll() from the main
 * loop: it reads, dispatches to your handlers, says hello, resubscribes,
 * retries and pings. Handlers run inside covey_poll().
 */
#ifndef COVEY_DEVICE_H
#define COVEY_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An AVR board (Arduino Uno: 2 KB of RAM) gets small buffers. These
   sizes shape covey_device, so the library and the sketch must agree:
   change them here or with build flags, never in a sketch alone. */
#if defined(__AVR__) && !defined(COVEY_MAX_FRAME)
#define COVEY_MAX_FRAME 128
#define COVEY_MAX_SUBS 2
#define COVEY_MAX_PATTERN 16
#define COVEY_MAX_NAME 40
#endif
#ifndef COVEY_MAX_FRAME
#define COVEY_MAX_FRAME 512 /* largest frame in either direction */
#endif
#ifndef COVEY_MAX_SUBS
#define COVEY_MAX_SUBS 8 /* subscriptions remembered for resubscribing */
#endif
#ifndef COVEY_MAX_PATTERN
#define COVEY_MAX_PATTERN 32 /* bytes of one subscription pattern, NUL included */
#endif
#ifndef COVEY_MAX_NAME
#define COVEY_MAX_NAME 128 /* bytes of a received sender or name, NUL included (on the stack) */
#endif
#ifndef COVEY_PING_INTERVAL_S
#define COVEY_PING_INTERVAL_S 10 /* the bridge expires a session after 3 missed pings */
#endif
#ifndef COVEY_RETRIES
#define COVEY_RETRIES 8 /* QoS 1 attempts before giving up */
#endif

#define COVEY_KEY_LEN 32
#define COVEY_NAME_MAX 63

/* Return codes. */
#define COVEY_OK 0
#define COVEY_EBUSY (-1)     /* a QoS 1 frame is still in flight: poll, then retry */
#define COVEY_ETOOBIG (-2)   /* does not fit the negotiated frame size */
#define COVEY_ENOTCONN (-3)  /* no session yet */
#define COVEY_EINVAL (-4)    /* bad argument (name too long, ...) */
#define COVEY_EIO (-5)       /* the transport's write failed */

typedef struct {
    /* Send bytes: one whole frame (datagram) or part of the stream. */
    int (*write)(void *ctx, const uint8_t *buf, size_t len);
    /* Non-blocking read: bytes read (a whole datagram, or stream bytes),
       0 when nothing is waiting, < 0 on error. */
    int (*read)(void *ctx, uint8_t *buf, size_t cap);
    /* A millisecond clock (wraps; differences are used). */
    uint32_t (*millis)(void *ctx);
    /* Fill buf with unpredictable bytes (hardware RNG; on a board without
       one, mix an analog pin's noise with micros()). */
    void (*random)(void *ctx, uint8_t *buf, size_t len);
    void *ctx;
    /* 1: a byte stream (serial, COBS framing); 0: datagrams (UDP). */
    int stream;
} covey_transport;

/* An event this device subscribed to, or a command sent to it. `from` is
   the sender (`NODE`, `NODE/DEVICE`). Strings are NUL-terminated. */
typedef void (*covey_message_fn)(void *user, const char *from, const char *name,
                                 const uint8_t *payload, size_t len);
/* A call: write the reply into `reply` (capacity `cap`) and return its
   length, or return -1 with an error text (NUL-terminated) in `reply`. */
typedef int (*covey_call_fn)(void *user, const char *from, const char *name,
                             const uint8_t *payload, size_t len, uint8_t *reply,
                             size_t cap);
/* The outcome of a QoS 1 frame: its sequence number and the ack status
   (0 ok; see PROTOCOL.md), or -1 when every retry went unanswered. */
typedef void (*covey_ack_fn)(void *user, uint32_t seq, int status);

typedef struct {
    uint32_t h[8];
    uint64_t len;
    uint8_t buf[64];
    uint32_t used;
} covey_sha256;

typedef struct {
    char from[COVEY_MAX_PATTERN];
    char name[COVEY_MAX_PATTERN];
} covey_sub;

typedef struct {
    covey_transport t;
    char name[COVEY_NAME_MAX + 1];
    char node[COVEY_NAME_MAX + 1]; /* the bridge's node, once connected */
    covey_sha256 inner, outer;     /* HMAC key schedule */
    covey_message_fn on_event, on_command;
    covey_call_fn on_call;
    covey_ack_fn on_ack;
    void *user;

    int connected;
    uint32_t sessions; /* welcomes accepted so far */
    uint8_t client_nonce[8];
    uint8_t nonce[8]; /* the session's */
    uint16_t max_frame;
    uint32_t out_seq;
    uint32_t in_highest, in_seen; /* replay window for the bridge's frames */
    uint8_t seal_offer;           /* offer sealed sessions in hello (default 1) */
    uint8_t sealed;               /* this session's frames are sealed */
    uint8_t seal_tx[32], seal_rx[32]; /* its ChaCha20-Poly1305 keys */
    uint32_t last_rx, last_ping, last_hello, hello_gap;
    uint16_t ping_interval_s;

    covey_sub subs[COVEY_MAX_SUBS];
    uint8_t nsubs, resub; /* subscriptions, and the next to re-send */

    /* The QoS 1 frame in flight (tagged, ready to resend). */
    uint8_t pending[COVEY_MAX_FRAME];
    uint16_t pending_len;
    uint32_t pending_seq, pending_due;
    uint8_t pending_tries;

    uint8_t rx[COVEY_MAX_FRAME + 8 + COVEY_MAX_FRAME / 254];
    uint16_t rx_len;
    uint8_t rx_overflow;
    uint8_t tx[COVEY_MAX_FRAME];
    /* counters: frames refused by reason */
    uint32_t bad_tag, bad_crc, replayed, malformed;
} covey_device;

/* Parse 64 hex digits (as `covey device add` prints them). 0 or EINVAL. */
int covey_key_from_hex(uint8_t key[COVEY_KEY_LEN], const char *hex);

/* Set up; the device says hello on its first covey_poll(). */
int covey_init(covey_device *d, const covey_transport *t, const char *name,
               const uint8_t key[COVEY_KEY_LEN]);
void covey_on_event(covey_device *d, covey_message_fn fn);
void covey_on_command(covey_device *d, covey_message_fn fn);
void covey_on_call(covey_device *d, covey_call_fn fn);
void covey_on_ack(covey_device *d, covey_ack_fn fn);
void covey_set_user(covey_device *d, void *user);
/* Seconds between pings (before the first poll; default
   COVEY_PING_INTERVAL_S). The bridge expires a session after three. */
void covey_set_ping_interval(covey_device *d, uint16_t seconds);
/* Offer sealed sessions (ChaCha20-Poly1305: payloads encrypted) in hello:
   on by default; 0 for tagged frames in clear (a bridge that requires
   sealing then refuses the device). Before the first poll. */
void covey_set_sealing(covey_device *d, int on);
/* Is the current session sealed? */
int covey_sealed(const covey_device *d);

/* Subscribe to events (esc patterns: `*` matches any run). Remembered and
   re-sent after every (re)connection. */
int covey_subscribe(covey_device *d, const char *from, const char *name);
/* Emit an event to every node. qos 0: fire and forget; qos 1: acked and
   retried (one in flight at a time: COVEY_EBUSY until it is answered). */
int covey_emit(covey_device *d, const char *name, const uint8_t *payload,
               size_t len, int qos);
/* A command to a node, `*`, or `NODE/DEVICE`. */
int covey_send(covey_device *d, const char *target, const char *name,
               const uint8_t *payload, size_t len, int qos);

/* Read, dispatch, hello, resubscribe, retry, ping. Call it often. */
void covey_poll(covey_device *d);
int covey_connected(const covey_device *d);
/* Is a QoS 1 frame (or a resubscription) still waiting for its ack? */
int covey_busy(const covey_device *d);

/* Building blocks, exposed for tests and other transports. */
void covey_sha256_init(covey_sha256 *s);
void covey_sha256_update(covey_sha256 *s, const uint8_t *p, size_t n);
void covey_sha256_final(covey_sha256 *s, uint8_t out[32]);
uint32_t covey_crc32(const uint8_t *p, size_t n);
/* ChaCha20-Poly1305 (RFC 8439) in place; open returns -1 (and leaves the
   bytes as they were) if the tag does not match. */
void covey_aead_seal(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                     size_t aad_len, uint8_t *buf, size_t n, uint8_t tag[16]);
int covey_aead_open(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                    size_t aad_len, uint8_t *buf, size_t n, const uint8_t tag[16]);
/* COBS-encode `n` bytes into `out` (capacity n + n/254 + 1); length. */
size_t covey_cobs_encode(const uint8_t *in, size_t n, uint8_t *out);
/* Decode in place; the decoded length, or -1 if malformed. */
int covey_cobs_decode(uint8_t *buf, size_t n);

#ifdef __cplusplus
}
#endif
#endif
