/*
 * ChaCha20-Poly1305 (RFC 8439) for sealed sessions: no malloc, no tables,
 * 32-bit arithmetic with 64-bit products (fine on an ESP8266 and on ARM
 * Thumb). Checked against RFC 8439's AEAD vector by `covey-device
 * selftest`, and against the bridge (ring) by the integration tests.
 */
#include "covey_device.h"

#include <string.h>

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}

/* ---- ChaCha20 (RFC 8439 §2.3) ---------------------------------------- */

#define ROTL(x, n) (((x) << (n)) | ((x) >> (32 - (n))))
#define QR(a, b, c, d)                                                                             \
    a += b, d ^= a, d = ROTL(d, 16), c += d, b ^= c, b = ROTL(b, 12), a += b, d ^= a,             \
    d = ROTL(d, 8), c += d, b ^= c, b = ROTL(b, 7)

/* One 64-byte key-stream block for `counter`. */
static void chacha_block(const uint8_t key[32], uint32_t counter, const uint8_t nonce[12],
                         uint8_t out[64]) {
    uint32_t in[16], x[16];
    int i;
    in[0] = 0x61707865, in[1] = 0x3320646e, in[2] = 0x79622d32, in[3] = 0x6b206574;
    for (i = 0; i < 8; i++) in[4 + i] = le32(key + 4 * i);
    in[12] = counter;
    for (i = 0; i < 3; i++) in[13 + i] = le32(nonce + 4 * i);
    memcpy(x, in, sizeof x);
    for (i = 0; i < 10; i++) {
        QR(x[0], x[4], x[8], x[12]), QR(x[1], x[5], x[9], x[13]);
        QR(x[2], x[6], x[10], x[14]), QR(x[3], x[7], x[11], x[15]);
        QR(x[0], x[5], x[10], x[15]), QR(x[1], x[6], x[11], x[12]);
        QR(x[2], x[7], x[8], x[13]), QR(x[3], x[4], x[9], x[14]);
    }
    for (i = 0; i < 16; i++) put_le32(out + 4 * i, x[i] + in[i]);
}

/* XOR `buf` with the key stream from block 1 on (block 0 keys Poly1305). */
static void chacha_xor(const uint8_t key[32], const uint8_t nonce[12], uint8_t *buf, size_t n) {
    uint8_t ks[64];
    uint32_t counter = 1;
    size_t i, k;
    for (i = 0; i < n; i += 64) {
        chacha_block(key, counter++, nonce, ks);
        for (k = 0; k < 64 && i + k < n; k++) buf[i + k] ^= ks[k];
    }
}

/* ---- Poly1305 (RFC 8439 §2.5), five 26-bit limbs ------------------- */

typedef struct {
    uint32_t r[5], h[5], s[4];
} poly1305;

static void poly_init(poly1305 *p, const uint8_t key[32]) {
    int i;
    p->r[0] = le32(key + 0) & 0x3ffffff;
    p->r[1] = (le32(key + 3) >> 2) & 0x3ffff03;
    p->r[2] = (le32(key + 6) >> 4) & 0x3ffc0ff;
    p->r[3] = (le32(key + 9) >> 6) & 0x3f03fff;
    p->r[4] = (le32(key + 12) >> 8) & 0x00fffff;
    for (i = 0; i < 5; i++) p->h[i] = 0;
    for (i = 0; i < 4; i++) p->s[i] = le32(key + 16 + 4 * i);
}

/* h = (h + block + 2^128) * r mod 2^130 - 5, for one full 16-byte block. */
static void poly_block(poly1305 *p, const uint8_t m[16]) {
    const uint32_t *r = p->r;
    uint32_t *h = p->h;
    uint32_t s1 = r[1] * 5, s2 = r[2] * 5, s3 = r[3] * 5, s4 = r[4] * 5, c;
    uint64_t d0, d1, d2, d3, d4;
    h[0] += le32(m + 0) & 0x3ffffff;
    h[1] += (le32(m + 3) >> 2) & 0x3ffffff;
    h[2] += (le32(m + 6) >> 4) & 0x3ffffff;
    h[3] += (le32(m + 9) >> 6) & 0x3ffffff;
    h[4] += (le32(m + 12) >> 8) | (1u << 24);
    d0 = (uint64_t)h[0] * r[0] + (uint64_t)h[1] * s4 + (uint64_t)h[2] * s3 + (uint64_t)h[3] * s2 +
         (uint64_t)h[4] * s1;
    d1 = (uint64_t)h[0] * r[1] + (uint64_t)h[1] * r[0] + (uint64_t)h[2] * s4 + (uint64_t)h[3] * s3 +
         (uint64_t)h[4] * s2;
    d2 = (uint64_t)h[0] * r[2] + (uint64_t)h[1] * r[1] + (uint64_t)h[2] * r[0] + (uint64_t)h[3] * s4 +
         (uint64_t)h[4] * s3;
    d3 = (uint64_t)h[0] * r[3] + (uint64_t)h[1] * r[2] + (uint64_t)h[2] * r[1] + (uint64_t)h[3] * r[0] +
         (uint64_t)h[4] * s4;
    d4 = (uint64_t)h[0] * r[4] + (uint64_t)h[1] * r[3] + (uint64_t)h[2] * r[2] + (uint64_t)h[3] * r[1] +
         (uint64_t)h[4] * r[0];
    c = (uint32_t)(d0 >> 26), h[0] = (uint32_t)d0 & 0x3ffffff;
    d1 += c, c = (uint32_t)(d1 >> 26), h[1] = (uint32_t)d1 & 0x3ffffff;
    d2 += c, c = (uint32_t)(d2 >> 26), h[2] = (uint32_t)d2 & 0x3ffffff;
    d3 += c, c = (uint32_t)(d3 >> 26), h[3] = (uint32_t)d3 & 0x3ffffff;
    d4 += c, c = (uint32_t)(d4 >> 26), h[4] = (uint32_t)d4 & 0x3ffffff;
    h[0] += c * 5, c = h[0] >> 26, h[0] &= 0x3ffffff;
    h[1] += c;
}

/* `n` bytes, the last block padded with zeros (RFC 8439's pad16). */
static void poly_padded(poly1305 *p, const uint8_t *m, size_t n) {
    uint8_t last[16];
    while (n >= 16) poly_block(p, m), m += 16, n -= 16;
    if (n) {
        memset(last, 0, sizeof last);
        memcpy(last, m, n);
        poly_block(p, last);
    }
}

static void poly_finish(poly1305 *p, uint8_t tag[16]) {
    uint32_t *h = p->h, g[5], c, mask;
    uint64_t f;
    int i;
    c = h[1] >> 26, h[1] &= 0x3ffffff;
    for (i = 2; i < 5; i++) h[i] += c, c = h[i] >> 26, h[i] &= 0x3ffffff;
    h[0] += c * 5, c = h[0] >> 26, h[0] &= 0x3ffffff;
    h[1] += c;
    /* g = h - (2^130 - 5); keep it if it did not go below zero. */
    g[0] = h[0] + 5, c = g[0] >> 26, g[0] &= 0x3ffffff;
    for (i = 1; i < 4; i++) g[i] = h[i] + c, c = g[i] >> 26, g[i] &= 0x3ffffff;
    g[4] = h[4] + c - (1u << 26);
    mask = (g[4] >> 31) - 1; /* all ones when g >= 0 */
    for (i = 0; i < 5; i++) h[i] = (h[i] & ~mask) | (g[i] & mask);
    /* To 128 bits, plus s. */
    h[0] = h[0] | h[1] << 26;
    h[1] = h[1] >> 6 | h[2] << 20;
    h[2] = h[2] >> 12 | h[3] << 14;
    h[3] = h[3] >> 18 | h[4] << 8;
    for (f = 0, i = 0; i < 4; i++) {
        f = (uint64_t)h[i] + p->s[i] + (f >> 32);
        put_le32(tag + 4 * i, (uint32_t)f);
    }
}

/* The tag over aad and ciphertext (RFC 8439 §2.8). */
static void aead_tag(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                     size_t aad_len, const uint8_t *ct, size_t n, uint8_t tag[16]) {
    uint8_t block[64], lens[16];
    poly1305 p;
    chacha_block(key, 0, nonce, block);
    poly_init(&p, block);
    poly_padded(&p, aad, aad_len);
    poly_padded(&p, ct, n);
    memset(lens, 0, sizeof lens);
    put_le32(lens, (uint32_t)aad_len), put_le32(lens + 8, (uint32_t)n);
    poly_block(&p, lens);
    poly_finish(&p, tag);
    memset(block, 0, sizeof block);
}

void covey_aead_seal(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                     size_t aad_len, uint8_t *buf, size_t n, uint8_t tag[16]) {
    chacha_xor(key, nonce, buf, n);
    aead_tag(key, nonce, aad, aad_len, buf, n, tag);
}

int covey_aead_open(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                    size_t aad_len, uint8_t *buf, size_t n, const uint8_t tag[16]) {
    uint8_t want[16], diff = 0;
    int i;
    aead_tag(key, nonce, aad, aad_len, buf, n, want);
    for (i = 0; i < 16; i++) diff |= (uint8_t)(want[i] ^ tag[i]);
    if (diff) return -1; /* constant time: no early exit */
    chacha_xor(key, nonce, buf, n);
    return 0;
}
