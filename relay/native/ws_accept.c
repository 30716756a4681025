/* Sec-WebSocket-Accept in C: see ws_accept.h. */
#include "ws_accept.h"

#include <stdint.h>
#include <string.h>

static const char GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

#define ROL(x, n) (((x) << (n)) | ((x) >> (32 - (n))))

static void sha1_block(uint32_t h[5], const unsigned char *p) {
    uint32_t w[80];
    for (int t = 0; t < 16; t++)
        w[t] = (uint32_t)p[4 * t] << 24 | (uint32_t)p[4 * t + 1] << 16 | (uint32_t)p[4 * t + 2] << 8 | p[4 * t + 3];
    for (int t = 16; t < 80; t++)
        w[t] = ROL(w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int t = 0; t < 80; t++) {
        uint32_t f, k;
        if (t < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (t < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (t < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        uint32_t tmp = ROL(a, 5) + f + e + k + w[t];
        e = d;
        d = c;
        c = ROL(b, 30);
        b = a;
        a = tmp;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

/* SHA-1 of a || b (RFC 3174), into digest[20]. */
static void sha1_two(const char *a, size_t an, const char *b, size_t bn, unsigned char digest[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    unsigned char block[64];
    size_t fill = 0;
    uint64_t bits = (uint64_t)(an + bn) * 8;
    const char *parts[2] = {a, b};
    size_t lens[2] = {an, bn};
    for (int i = 0; i < 2; i++) {
        const unsigned char *s = (const unsigned char *)parts[i];
        size_t n = lens[i];
        while (n) {
            size_t take = 64 - fill < n ? 64 - fill : n;
            memcpy(block + fill, s, take);
            fill += take;
            s += take;
            n -= take;
            if (fill == 64) {
                sha1_block(h, block);
                fill = 0;
            }
        }
    }
    block[fill++] = 0x80;
    if (fill > 56) {
        memset(block + fill, 0, 64 - fill);
        sha1_block(h, block);
        fill = 0;
    }
    memset(block + fill, 0, 56 - fill);
    for (int i = 0; i < 8; i++)
        block[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
    sha1_block(h, block);
    for (int i = 0; i < 5; i++) {
        digest[4 * i] = (unsigned char)(h[i] >> 24);
        digest[4 * i + 1] = (unsigned char)(h[i] >> 16);
        digest[4 * i + 2] = (unsigned char)(h[i] >> 8);
        digest[4 * i + 3] = (unsigned char)h[i];
    }
}

void ws_accept(const char *key, size_t n, char *out) {
    unsigned char d[21];
    sha1_two(key, n, GUID, sizeof GUID - 1, d);
    d[20] = 0;
    /* 20 bytes: six groups of 3, then 2 bytes and one '=' */
    for (int i = 0, o = 0; i < 21; i += 3, o += 4) {
        uint32_t v = (uint32_t)d[i] << 16 | (uint32_t)d[i + 1] << 8 | (i + 2 < 21 ? d[i + 2] : 0);
        out[o] = B64[v >> 18 & 63];
        out[o + 1] = B64[v >> 12 & 63];
        out[o + 2] = B64[v >> 6 & 63];
        out[o + 3] = B64[v & 63];
    }
    out[WS_ACCEPT_LEN - 1] = '=';
}
