/*
 * Replays the bridge's fuzz corpus (host/fuzz/corpus/device_frame) through
 * the C library's decoders, for AddressSanitizer and UBSan:
 *   make -C firmware-bridge/c asan CORPUS=host/fuzz/corpus/device_frame
 * Each input goes in three ways, as the Rust target does: as serial bytes
 * (COBS, CRC, the receive buffer), as one datagram, and re-tagged with the
 * device's session key so the body parsers run on it. The library's
 * source is included so its internal functions are reachable.
 */
#define _DEFAULT_SOURCE
#include "../src/covey_device.c"
#include "../src/covey_sha256.c"
#include "../src/covey_aead.c"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>

static const uint8_t *input;
static size_t input_len, input_at;

static int t_write(void *ctx, const uint8_t *buf, size_t len) {
    (void)ctx, (void)buf;
    return (int)len;
}
static int t_read(void *ctx, uint8_t *buf, size_t cap) {
    size_t n = input_len - input_at;
    (void)ctx;
    if (n > cap) n = cap;
    memcpy(buf, input + input_at, n);
    input_at += n;
    return (int)n;
}
static uint32_t t_millis(void *ctx) {
    (void)ctx;
    return 1000;
}
static void t_random(void *ctx, uint8_t *buf, size_t len) {
    (void)ctx;
    memset(buf, 7, len);
}
static void on_msg(void *u, const char *from, const char *name, const uint8_t *p, size_t n) {
    (void)u, (void)from, (void)name, (void)p, (void)n;
}
static int on_call_cb(void *u, const char *from, const char *name, const uint8_t *p, size_t n,
                      uint8_t *reply, size_t cap) {
    (void)u, (void)from, (void)name;
    if (n > cap) n = cap;
    memcpy(reply, p, n);
    return (int)n;
}

static void setup(covey_device *d, int stream) {
    static const uint8_t key[COVEY_KEY_LEN] = {1};
    covey_transport t = {t_write, t_read, t_millis, t_random, NULL, stream};
    covey_init(d, &t, "esp-1", key);
    covey_on_event(d, on_msg);
    covey_on_command(d, on_msg);
    covey_on_call(d, on_call_cb);
    d->connected = 1;
    memset(d->nonce, 2, 8);
    d->max_frame = COVEY_MAX_FRAME;
}

static void replay(const uint8_t *data, size_t n) {
    static covey_device d;
    static uint8_t frame[COVEY_MAX_FRAME];
    int stream;
    for (stream = 1; stream >= 0; stream--) {
        setup(&d, stream);
        input = data, input_len = n, input_at = 0;
        while (input_at < input_len) read_all(&d);
    }
    /* Re-tagged as the bridge's frame of this session. */
    if (n >= MIN_FRAME && n <= COVEY_MAX_FRAME) {
        setup(&d, 0);
        memcpy(frame, data, n);
        frame[0] = VERSION;
        put32(frame + 3, 5);
        tag(&d, DIR_BRIDGE, d.nonce, frame, n - TAG_LEN, frame + n - TAG_LEN);
        handle(&d, frame, n);
        /* A welcome for this device's hello. */
        if (frame[1] == T_WELCOME && n >= HEADER_LEN + 20 + TAG_LEN) {
            memcpy(frame + HEADER_LEN, d.client_nonce, 8);
            tag(&d, DIR_BRIDGE, frame + HEADER_LEN + 8, frame, n - TAG_LEN, frame + n - TAG_LEN);
            d.connected = 0;
            handle(&d, frame, n);
        }
    }
}

/* Random mutations of an input (bit flips, byte sets, truncation): a
   cheap extra search on top of the corpus. */
static void mutate_and_replay(const uint8_t *data, size_t n, long rounds) {
    static uint8_t m[4096];
    uint32_t x = 2463534242u;
    long r;
    if (n > sizeof m) n = sizeof m;
    for (r = 0; r < rounds; r++) {
        size_t len = n, k, edits;
        memcpy(m, data, n);
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        edits = 1 + x % 4;
        for (k = 0; k < edits && len > 0; k++) {
            x ^= x << 13, x ^= x >> 17, x ^= x << 5;
            switch (x % 4) {
            case 0: m[(x >> 8) % len] ^= (uint8_t)(1u << ((x >> 3) % 8)); break;
            case 1: m[(x >> 8) % len] = (uint8_t)(x >> 24); break;
            case 2: len = (x >> 8) % (len + 1); break;
            default: m[(x >> 8) % len] = 0; break;
            }
        }
        replay(m, len);
    }
}

int main(int argc, char **argv) {
    DIR *dir;
    struct dirent *e;
    int count = 0;
    long rounds = argc == 4 && !strcmp(argv[2], "--mutate") ? atol(argv[3]) : 0;
    if ((argc != 2 && !rounds) || !(dir = opendir(argv[1]))) {
        fprintf(stderr, "usage: fuzz_replay CORPUS_DIR [--mutate ROUNDS]\n");
        return 2;
    }
    while ((e = readdir(dir))) {
        char path[4096];
        FILE *f;
        static uint8_t buf[1 << 20];
        size_t n;
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", argv[1], e->d_name);
        if (!(f = fopen(path, "rb"))) continue;
        n = fread(buf, 1, sizeof buf, f);
        fclose(f);
        replay(buf, n);
        mutate_and_replay(buf, n, rounds);
        count++;
    }
    closedir(dir);
    printf("C decoder: %d inputs replayed under the sanitizers (%ld mutations each)\n", count, rounds);
    return count > 0 ? 0 : 1;
}
