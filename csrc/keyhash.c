/* keyhash.c: the canonical key string and MD5 (contract in keyhash.h).
 *
 * The pieces are written once into a single buffer, sorted as (pointer, length)
 * pairs, and copied into the result with commas: two passes over the bytes. */
#include "keyhash.h"

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

static size_t digits(uint64_t v) {
    size_t n = 1;
    while (v >= 10) {
        v /= 10;
        n++;
    }
    return n;
}

/* Writes v in decimal at out; returns the number of characters. */
static size_t put_u64(char *out, uint64_t v) {
    size_t n = digits(v);
    for (size_t i = n; i > 0; i--) {
        out[i - 1] = (char)('0' + v % 10);
        v /= 10;
    }
    return n;
}

static size_t shape_len(const kh_entry *e) {
    size_t n = 0;
    for (int d = 0; d < e->ndim; d++)
        n += digits(e->shape[d]) + (d ? 1 : 0);
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
        pieces[k].p = buf + w;
        memcpy(buf + w, e->key, e->key_len);
        w += e->key_len;
        pieces[k].len = e->key_len;
        k++;
        if (with_shape) {
            pieces[k].p = buf + w;
            memcpy(buf + w, e->key, e->key_len);
            w += e->key_len;
            buf[w++] = ':';
            for (int d = 0; d < e->ndim; d++) {
                if (d)
                    buf[w++] = '_';
                w += put_u64(buf + w, e->shape[d]);
            }
            pieces[k].len = (size_t)(buf + w - pieces[k].p);
            k++;
        }
    }
    /* entries given in name order yield pieces nearly in order: check first */
    int sorted = 1;
    for (size_t i = 1; i < n_pieces && sorted; i++)
        sorted = piece_cmp(&pieces[i - 1], &pieces[i]) <= 0;
    if (!sorted)
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

/* The four rounds of RFC 1321, unrolled: each step adds a round function of
 * three words, a message word and a constant, rotates and adds. */
#define MD5_F(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
#define MD5_G(x, y, z) ((y) ^ ((z) & ((x) ^ (y))))
#define MD5_H(x, y, z) ((x) ^ (y) ^ (z))
#define MD5_I(x, y, z) ((y) ^ ((x) | ~(z)))
#define MD5_STEP(f, a, b, c, d, m, k, s)                                                                               \
    do {                                                                                                               \
        (a) += f((b), (c), (d)) + (m) + (k);                                                                           \
        (a) = ((a) << (s)) | ((a) >> (32 - (s)));                                                                      \
        (a) += (b);                                                                                                    \
    } while (0)

static void md5_block(md5_state *st, const unsigned char *p) {
    uint32_t m[16];
    for (int i = 0; i < 16; i++)
        m[i] = (uint32_t)p[i * 4] | (uint32_t)p[i * 4 + 1] << 8 | (uint32_t)p[i * 4 + 2] << 16 |
               (uint32_t)p[i * 4 + 3] << 24;
    uint32_t a = st->a, b = st->b, c = st->c, d = st->d;
    MD5_STEP(MD5_F, a, b, c, d, m[0], 0xd76aa478, 7);
    MD5_STEP(MD5_F, d, a, b, c, m[1], 0xe8c7b756, 12);
    MD5_STEP(MD5_F, c, d, a, b, m[2], 0x242070db, 17);
    MD5_STEP(MD5_F, b, c, d, a, m[3], 0xc1bdceee, 22);
    MD5_STEP(MD5_F, a, b, c, d, m[4], 0xf57c0faf, 7);
    MD5_STEP(MD5_F, d, a, b, c, m[5], 0x4787c62a, 12);
    MD5_STEP(MD5_F, c, d, a, b, m[6], 0xa8304613, 17);
    MD5_STEP(MD5_F, b, c, d, a, m[7], 0xfd469501, 22);
    MD5_STEP(MD5_F, a, b, c, d, m[8], 0x698098d8, 7);
    MD5_STEP(MD5_F, d, a, b, c, m[9], 0x8b44f7af, 12);
    MD5_STEP(MD5_F, c, d, a, b, m[10], 0xffff5bb1, 17);
    MD5_STEP(MD5_F, b, c, d, a, m[11], 0x895cd7be, 22);
    MD5_STEP(MD5_F, a, b, c, d, m[12], 0x6b901122, 7);
    MD5_STEP(MD5_F, d, a, b, c, m[13], 0xfd987193, 12);
    MD5_STEP(MD5_F, c, d, a, b, m[14], 0xa679438e, 17);
    MD5_STEP(MD5_F, b, c, d, a, m[15], 0x49b40821, 22);
    MD5_STEP(MD5_G, a, b, c, d, m[1], 0xf61e2562, 5);
    MD5_STEP(MD5_G, d, a, b, c, m[6], 0xc040b340, 9);
    MD5_STEP(MD5_G, c, d, a, b, m[11], 0x265e5a51, 14);
    MD5_STEP(MD5_G, b, c, d, a, m[0], 0xe9b6c7aa, 20);
    MD5_STEP(MD5_G, a, b, c, d, m[5], 0xd62f105d, 5);
    MD5_STEP(MD5_G, d, a, b, c, m[10], 0x02441453, 9);
    MD5_STEP(MD5_G, c, d, a, b, m[15], 0xd8a1e681, 14);
    MD5_STEP(MD5_G, b, c, d, a, m[4], 0xe7d3fbc8, 20);
    MD5_STEP(MD5_G, a, b, c, d, m[9], 0x21e1cde6, 5);
    MD5_STEP(MD5_G, d, a, b, c, m[14], 0xc33707d6, 9);
    MD5_STEP(MD5_G, c, d, a, b, m[3], 0xf4d50d87, 14);
    MD5_STEP(MD5_G, b, c, d, a, m[8], 0x455a14ed, 20);
    MD5_STEP(MD5_G, a, b, c, d, m[13], 0xa9e3e905, 5);
    MD5_STEP(MD5_G, d, a, b, c, m[2], 0xfcefa3f8, 9);
    MD5_STEP(MD5_G, c, d, a, b, m[7], 0x676f02d9, 14);
    MD5_STEP(MD5_G, b, c, d, a, m[12], 0x8d2a4c8a, 20);
    MD5_STEP(MD5_H, a, b, c, d, m[5], 0xfffa3942, 4);
    MD5_STEP(MD5_H, d, a, b, c, m[8], 0x8771f681, 11);
    MD5_STEP(MD5_H, c, d, a, b, m[11], 0x6d9d6122, 16);
    MD5_STEP(MD5_H, b, c, d, a, m[14], 0xfde5380c, 23);
    MD5_STEP(MD5_H, a, b, c, d, m[1], 0xa4beea44, 4);
    MD5_STEP(MD5_H, d, a, b, c, m[4], 0x4bdecfa9, 11);
    MD5_STEP(MD5_H, c, d, a, b, m[7], 0xf6bb4b60, 16);
    MD5_STEP(MD5_H, b, c, d, a, m[10], 0xbebfbc70, 23);
    MD5_STEP(MD5_H, a, b, c, d, m[13], 0x289b7ec6, 4);
    MD5_STEP(MD5_H, d, a, b, c, m[0], 0xeaa127fa, 11);
    MD5_STEP(MD5_H, c, d, a, b, m[3], 0xd4ef3085, 16);
    MD5_STEP(MD5_H, b, c, d, a, m[6], 0x04881d05, 23);
    MD5_STEP(MD5_H, a, b, c, d, m[9], 0xd9d4d039, 4);
    MD5_STEP(MD5_H, d, a, b, c, m[12], 0xe6db99e5, 11);
    MD5_STEP(MD5_H, c, d, a, b, m[15], 0x1fa27cf8, 16);
    MD5_STEP(MD5_H, b, c, d, a, m[2], 0xc4ac5665, 23);
    MD5_STEP(MD5_I, a, b, c, d, m[0], 0xf4292244, 6);
    MD5_STEP(MD5_I, d, a, b, c, m[7], 0x432aff97, 10);
    MD5_STEP(MD5_I, c, d, a, b, m[14], 0xab9423a7, 15);
    MD5_STEP(MD5_I, b, c, d, a, m[5], 0xfc93a039, 21);
    MD5_STEP(MD5_I, a, b, c, d, m[12], 0x655b59c3, 6);
    MD5_STEP(MD5_I, d, a, b, c, m[3], 0x8f0ccc92, 10);
    MD5_STEP(MD5_I, c, d, a, b, m[10], 0xffeff47d, 15);
    MD5_STEP(MD5_I, b, c, d, a, m[1], 0x85845dd1, 21);
    MD5_STEP(MD5_I, a, b, c, d, m[8], 0x6fa87e4f, 6);
    MD5_STEP(MD5_I, d, a, b, c, m[15], 0xfe2ce6e0, 10);
    MD5_STEP(MD5_I, c, d, a, b, m[6], 0xa3014314, 15);
    MD5_STEP(MD5_I, b, c, d, a, m[13], 0x4e0811a1, 21);
    MD5_STEP(MD5_I, a, b, c, d, m[4], 0xf7537e82, 6);
    MD5_STEP(MD5_I, d, a, b, c, m[11], 0xbd3af235, 10);
    MD5_STEP(MD5_I, c, d, a, b, m[2], 0x2ad7d2bb, 15);
    MD5_STEP(MD5_I, b, c, d, a, m[9], 0xeb86d391, 21);
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
