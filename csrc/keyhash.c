/* keyhash.c: the canonical key string and MD5 (contract in keyhash.h).
 *
 * The pieces are written once into a single buffer, sorted as (pointer, length)
 * pairs, and copied into the result with commas: two passes over the bytes. */
#include "keyhash.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *p;
    size_t len;
} piece;

static int piece_cmp(const void *x, const void *y) {
    const piece *a = x, *b = y;
    size_t n = a->len < b->len ? a->len : b->len;
    int r = memcmp(a->p, b->p, n);
    if (r)
        return r;
    return a->len < b->len ? -1 : a->len > b->len;
}

static size_t shape_len(const kh_entry *e) {
    size_t n = 0;
    char tmp[24];
    for (int d = 0; d < e->ndim; d++)
        n += (size_t)snprintf(tmp, sizeof tmp, "%llu", (unsigned long long)e->shape[d]) + (d ? 1 : 0);
    return n;
}

int kh_keys_string(const kh_entry *entries, size_t n, int with_shape, char **out, size_t *out_len, ds_error *err) {
    size_t total = 0, n_pieces = 0;
    for (size_t i = 0; i < n; i++) {
        const kh_entry *e = &entries[i];
        if (e->ndim < 0) {
            total += e->key_len + 1 + e->nested_len;
            n_pieces++;
        } else {
            if (with_shape) {
                total += e->key_len + 1 + shape_len(e);
                n_pieces++;
            }
            total += e->key_len;
            n_pieces++;
        }
    }
    char *buf = malloc(total + 1);
    piece *pieces = malloc((n_pieces ? n_pieces : 1) * sizeof *pieces);
    char *res = malloc(total + (n_pieces ? n_pieces - 1 : 0) + 1);
    if (!buf || !pieces || !res) {
        free(buf);
        free(pieces);
        free(res);
        return ds_fail(err, DS_ERR_NOMEM, "out of memory while hashing %zu keys", n);
    }
    size_t w = 0, k = 0;
    for (size_t i = 0; i < n; i++) {
        const kh_entry *e = &entries[i];
        if (e->ndim < 0) {
            pieces[k].p = buf + w;
            memcpy(buf + w, e->key, e->key_len);
            w += e->key_len;
            buf[w++] = '|';
            memcpy(buf + w, e->nested, e->nested_len);
            w += e->nested_len;
            pieces[k].len = (size_t)(buf + w - pieces[k].p);
            k++;
            continue;
        }
        if (with_shape) {
            pieces[k].p = buf + w;
            memcpy(buf + w, e->key, e->key_len);
            w += e->key_len;
            buf[w++] = ':';
            for (int d = 0; d < e->ndim; d++)
                w += (size_t)sprintf(buf + w, d ? "_%llu" : "%llu", (unsigned long long)e->shape[d]);
            pieces[k].len = (size_t)(buf + w - pieces[k].p);
            k++;
        }
        pieces[k].p = buf + w;
        memcpy(buf + w, e->key, e->key_len);
        w += e->key_len;
        pieces[k].len = e->key_len;
        k++;
    }
    if (n_pieces > 1)
        qsort(pieces, n_pieces, sizeof *pieces, piece_cmp);
    size_t r = 0;
    for (size_t i = 0; i < n_pieces; i++) {
        if (i)
            res[r++] = ',';
        memcpy(res + r, pieces[i].p, pieces[i].len);
        r += pieces[i].len;
    }
    res[r] = '\0';
    free(buf);
    free(pieces);
    *out = res;
    *out_len = r;
    return 0;
}

/* ---- MD5, RFC 1321 ---- */

typedef struct {
    uint32_t a, b, c, d;
} md5_state;

static uint32_t rotl(uint32_t x, int s) { return (x << s) | (x >> (32 - s)); }

static void md5_block(md5_state *st, const unsigned char *p) {
    static const uint32_t K[64] = {
        0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
        0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
        0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
        0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
        0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
        0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
        0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
        0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391};
    static const int S[64] = {7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22,
                              5, 9,  14, 20, 5, 9,  14, 20, 5, 9,  14, 20, 5, 9,  14, 20,
                              4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23,
                              6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21};
    uint32_t m[16];
    for (int i = 0; i < 16; i++)
        m[i] = (uint32_t)p[i * 4] | (uint32_t)p[i * 4 + 1] << 8 | (uint32_t)p[i * 4 + 2] << 16 |
               (uint32_t)p[i * 4 + 3] << 24;
    uint32_t a = st->a, b = st->b, c = st->c, d = st->d;
    for (int i = 0; i < 64; i++) {
        uint32_t f;
        int g;
        if (i < 16) {
            f = (b & c) | (~b & d);
            g = i;
        } else if (i < 32) {
            f = (d & b) | (~d & c);
            g = (5 * i + 1) % 16;
        } else if (i < 48) {
            f = b ^ c ^ d;
            g = (3 * i + 5) % 16;
        } else {
            f = c ^ (b | ~d);
            g = (7 * i) % 16;
        }
        uint32_t t = d;
        d = c;
        c = b;
        b = b + rotl(a + f + K[i] + m[g], S[i]);
        a = t;
    }
    st->a += a;
    st->b += b;
    st->c += c;
    st->d += d;
}

void kh_md5_hex(const void *data, size_t len, char hex[33]) {
    md5_state st = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};
    const unsigned char *p = data;
    size_t full = len / 64;
    for (size_t i = 0; i < full; i++)
        md5_block(&st, p + i * 64);
    unsigned char tail[128];
    size_t rem = len - full * 64;
    memcpy(tail, p + full * 64, rem);
    tail[rem] = 0x80;
    size_t tail_len = rem < 56 ? 64 : 128;
    memset(tail + rem + 1, 0, tail_len - rem - 1);
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        tail[tail_len - 8 + i] = (unsigned char)(bits >> (8 * i));
    md5_block(&st, tail);
    if (tail_len == 128)
        md5_block(&st, tail + 64);
    uint32_t words[4] = {st.a, st.b, st.c, st.d};
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        unsigned char byte = (unsigned char)(words[i / 4] >> (8 * (i % 4)));
        hex[2 * i] = digits[byte >> 4];
        hex[2 * i + 1] = digits[byte & 15];
    }
    hex[32] = '\0';
}
