/* torchzip.c: the zip directory of a torch.save checkpoint (contract in torchzip.h). */
#include "torchzip.h"

#include <stdlib.h>
#include <string.h>

#include "io.h"

#define SIG_EOCD 0x06054b50u
#define SIG_EOCD64 0x06064b50u
#define SIG_LOC64 0x07064b50u
#define SIG_CDIR 0x02014b50u
#define SIG_LOCAL 0x04034b50u
#define EOCD_SIZE 22
#define MAX_COMMENT 65535
#define MAX_ENTRIES (1u << 24)

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32); }

void tz_free(tz_archive *a) {
    for (size_t i = 0; i < a->n; i++)
        free(a->entries[i].name);
    free(a->entries);
    free(a->prefix);
    free(a->index);
    memset(a, 0, sizeof *a);
}

/* Finds the end-of-central-directory record in the file's tail. */
static int find_eocd(int fd, uint64_t size, uint8_t *rec, uint64_t *at, ds_error *err) {
    if (size < EOCD_SIZE)
        return ds_fail(err, DS_ERR_UNSUPPORTED, "%llu bytes is too short for a zip archive", (unsigned long long)size);
    size_t tail = size < EOCD_SIZE + MAX_COMMENT ? (size_t)size : EOCD_SIZE + MAX_COMMENT;
    uint8_t *buf = malloc(tail);
    if (!buf)
        return ds_fail(err, DS_ERR_NOMEM, "out of memory");
    if (io_pread(fd, buf, tail, size - tail, err)) {
        free(buf);
        return -1;
    }
    for (size_t i = tail - EOCD_SIZE + 1; i-- > 0;) {
        if (rd32(buf + i) == SIG_EOCD && i + EOCD_SIZE + rd16(buf + i + 20) == tail) {
            memcpy(rec, buf + i, EOCD_SIZE);
            *at = size - tail + i;
            free(buf);
            return 0;
        }
    }
    int zip_start = tail >= 4 && size == tail && rd32(buf) == SIG_LOCAL;
    uint8_t head[4] = {0};
    free(buf);
    if (!zip_start && size > tail && io_pread(fd, head, 4, 0, err) == 0)
        zip_start = rd32(head) == SIG_LOCAL;
    if (zip_start) /* a zip that lost its end */
        return ds_fail(err, DS_ERR_FORMAT, "a zip archive without its end-of-central-directory record: truncated?");
    return ds_fail(err, DS_ERR_UNSUPPORTED, "no zip end-of-central-directory record (not a zip archive)");
}

/* Values of the ZIP64 extended-information extra field that replace the 0xFFFFFFFF placeholders. */
static int zip64_extra(const uint8_t *extra, size_t len, uint64_t *usize, uint64_t *csize, uint64_t *local,
                       const char *name, ds_error *err) {
    size_t i = 0;
    while (i + 4 <= len) {
        uint16_t id = rd16(extra + i), n = rd16(extra + i + 2);
        if (i + 4 + n > len)
            break;
        if (id == 0x0001) {
            const uint8_t *p = extra + i + 4;
            size_t left = n;
            uint64_t *fields[3] = {usize, csize, local};
            for (int k = 0; k < 3; k++) {
                if (*fields[k] != 0xFFFFFFFFu)
                    continue;
                if (left < 8)
                    return ds_fail(err, DS_ERR_FORMAT, "zip entry '%.200s': ZIP64 extra field too short", name);
                *fields[k] = rd64(p);
                p += 8;
                left -= 8;
            }
            return 0;
        }
        i += 4 + (size_t)n;
    }
    if (*usize == 0xFFFFFFFFu || *csize == 0xFFFFFFFFu || *local == 0xFFFFFFFFu)
        return ds_fail(err, DS_ERR_FORMAT, "zip entry '%.200s': ZIP64 sizes announced but no ZIP64 extra field", name);
    return 0;
}

/* FNV-1a over two pieces (prefix and rest of a name), so a lookup needs no joined copy. */
static uint64_t name_hash(const char *a, size_t al, const char *b, size_t bl) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < al; i++)
        h = (h ^ (uint8_t)a[i]) * 1099511628211ull;
    for (size_t i = 0; i < bl; i++)
        h = (h ^ (uint8_t)b[i]) * 1099511628211ull;
    return h;
}

/* Fills a->index with every entry; fails naming an entry that appears twice. */
static int build_index(tz_archive *a, ds_error *err) {
    size_t cap = 16;
    while (cap < 2 * a->n)
        cap *= 2;
    a->index = calloc(cap, sizeof *a->index);
    if (!a->index)
        return ds_fail(err, DS_ERR_NOMEM, "out of memory for a zip directory of %zu entries", a->n);
    a->index_cap = cap;
    for (size_t i = 0; i < a->n; i++) {
        const tz_entry *e = &a->entries[i];
        size_t slot = (size_t)name_hash(e->name, e->name_len, "", 0) & (cap - 1);
        while (a->index[slot]) {
            const tz_entry *o = &a->entries[a->index[slot] - 1];
            if (o->name_len == e->name_len && memcmp(o->name, e->name, e->name_len) == 0)
                return ds_fail(err, DS_ERR_FORMAT,
                               "zip entry '%.200s' appears twice in the directory (torch.save never writes that, and "
                               "which copy a reader takes depends on its zip library): refused",
                               e->name);
            slot = (slot + 1) & (cap - 1);
        }
        a->index[slot] = i + 1;
    }
    return 0;
}

typedef struct {
    uint64_t begin, end;
    size_t entry;
} span;

static int span_cmp(const void *x, const void *y) {
    const span *a = x, *b = y;
    return a->begin < b->begin ? -1 : a->begin > b->begin;
}

/* Refuses entries whose bytes (local header to last byte) overlap: each byte of a checkpoint
 * belongs to one entry, so no directory can make one region count as many storages. */
static int check_overlaps(const tz_archive *a, ds_error *err) {
    if (a->n < 2)
        return 0;
    span *s = malloc(a->n * sizeof *s);
    if (!s)
        return ds_fail(err, DS_ERR_NOMEM, "out of memory for a zip directory of %zu entries", a->n);
    for (size_t i = 0; i < a->n; i++) {
        s[i].begin = a->entries[i].local;
        s[i].end = a->entries[i].end;
        s[i].entry = i;
    }
    qsort(s, a->n, sizeof *s, span_cmp);
    for (size_t i = 1; i < a->n; i++) {
        if (s[i].begin < s[i - 1].end) {
            const tz_entry *x = &a->entries[s[i - 1].entry], *y = &a->entries[s[i].entry];
            ds_fail(err, DS_ERR_FORMAT,
                    "zip entries '%.200s' (bytes [%llu, %llu)) and '%.200s' (from byte %llu) overlap: the directory "
                    "lies about their sizes or places",
                    x->name, (unsigned long long)x->local, (unsigned long long)x->end, y->name,
                    (unsigned long long)y->local);
            free(s);
            return -1;
        }
    }
    free(s);
    return 0;
}

int tz_open(int fd, uint64_t size, tz_archive *a, ds_error *err) {
    memset(a, 0, sizeof *a);
    uint8_t eocd[EOCD_SIZE] = {0};
    uint64_t eocd_at = 0;
    if (find_eocd(fd, size, eocd, &eocd_at, err))
        return -1;
    uint64_t n = rd16(eocd + 10), cd_size = rd32(eocd + 12), cd_off = rd32(eocd + 16);
    if ((n == 0xFFFF || cd_size == 0xFFFFFFFFu || cd_off == 0xFFFFFFFFu) && eocd_at >= 20) {
        uint8_t loc[20], rec[56];
        if (io_pread(fd, loc, 20, eocd_at - 20, err))
            return -1;
        if (rd32(loc) == SIG_LOC64) {
            uint64_t rec_at = rd64(loc + 8);
            if (rec_at > size || size - rec_at < 56)
                return ds_fail(err, DS_ERR_FORMAT, "ZIP64 end record at offset %llu is past the end of the file",
                               (unsigned long long)rec_at);
            if (io_pread(fd, rec, 56, rec_at, err))
                return -1;
            if (rd32(rec) != SIG_EOCD64)
                return ds_fail(err, DS_ERR_FORMAT, "bad ZIP64 end record signature at offset %llu",
                               (unsigned long long)rec_at);
            n = rd64(rec + 32);
            cd_size = rd64(rec + 40);
            cd_off = rd64(rec + 48);
        }
    }
    if (cd_off > size || cd_size > size - cd_off)
        return ds_fail(err, DS_ERR_FORMAT,
                       "the zip central directory (offset %llu, %llu bytes) runs past the end of the file "
                       "(%llu bytes): truncated?",
                       (unsigned long long)cd_off, (unsigned long long)cd_size, (unsigned long long)size);
    if (n > MAX_ENTRIES || n * 46 > cd_size)
        return ds_fail(err, DS_ERR_FORMAT, "the zip directory claims %llu entries in %llu bytes", (unsigned long long)n,
                       (unsigned long long)cd_size);
    uint8_t *cd = malloc(cd_size ? (size_t)cd_size : 1);
    a->entries = calloc(n ? (size_t)n : 1, sizeof *a->entries);
    if (!cd || !a->entries) {
        free(cd);
        return ds_fail(err, DS_ERR_NOMEM, "out of memory for a zip directory of %llu bytes",
                       (unsigned long long)cd_size);
    }
    if (io_pread(fd, cd, (size_t)cd_size, cd_off, err)) {
        free(cd);
        tz_free(a);
        return -1;
    }
    size_t pos = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (pos + 46 > cd_size || rd32(cd + pos) != SIG_CDIR) {
            ds_fail(err, DS_ERR_FORMAT, "zip directory entry %llu is malformed", (unsigned long long)i);
            goto fail;
        }
        const uint8_t *e = cd + pos;
        uint16_t method = rd16(e + 10), name_len = rd16(e + 28), extra_len = rd16(e + 30), comment_len = rd16(e + 32);
        uint64_t csize = rd32(e + 20), usize = rd32(e + 24), local = rd32(e + 42);
        if (pos + 46 + (size_t)name_len + extra_len + comment_len > cd_size) {
            ds_fail(err, DS_ERR_FORMAT, "zip directory entry %llu runs past the directory", (unsigned long long)i);
            goto fail;
        }
        tz_entry *t = &a->entries[a->n];
        t->name = malloc((size_t)name_len + 1);
        if (!t->name) {
            ds_fail(err, DS_ERR_NOMEM, "out of memory");
            goto fail;
        }
        memcpy(t->name, e + 46, name_len);
        t->name[name_len] = 0;
        t->name_len = name_len;
        a->n++;
        if (memchr(t->name, 0, name_len)) {
            ds_fail(err, DS_ERR_FORMAT, "zip entry %llu has a NUL byte in its name", (unsigned long long)i);
            goto fail;
        }
        if (zip64_extra(e + 46 + name_len, extra_len, &usize, &csize, &local, t->name, err))
            goto fail;
        t->method = method;
        t->size = usize;
        if (method == 0 && csize != usize) {
            ds_fail(err, DS_ERR_FORMAT, "zip entry '%.200s' is stored but its sizes differ (%llu, %llu)", t->name,
                    (unsigned long long)csize, (unsigned long long)usize);
            goto fail;
        }
        /* the payload starts after the local header, whose name and extra lengths are its own */
        uint8_t lh[30];
        if (local > size || size - local < 30) {
            ds_fail(err, DS_ERR_FORMAT, "zip entry '%.200s': local header at offset %llu is past the end of the file",
                    t->name, (unsigned long long)local);
            goto fail;
        }
        if (io_pread(fd, lh, 30, local, err))
            goto fail;
        if (rd32(lh) != SIG_LOCAL) {
            ds_fail(err, DS_ERR_FORMAT, "zip entry '%.200s': no local header at offset %llu", t->name,
                    (unsigned long long)local);
            goto fail;
        }
        uint64_t data = local + 30 + rd16(lh + 26) + rd16(lh + 28);
        if (data > size || csize > size - data) {
            ds_fail(err, DS_ERR_FORMAT,
                    "zip entry '%.200s' (%llu bytes at offset %llu) runs past the end of the file (%llu bytes): "
                    "truncated?",
                    t->name, (unsigned long long)csize, (unsigned long long)data, (unsigned long long)size);
            goto fail;
        }
        t->local = local;
        t->offset = data;
        t->end = data + csize;
        pos += 46 + (size_t)name_len + extra_len + comment_len;
    }
    free(cd);
    cd = NULL;
    if (build_index(a, err) || check_overlaps(a, err))
        goto fail;
    /* the top folder: everything up to the first '/' of the first entry */
    const char *slash = a->n ? strchr(a->entries[0].name, '/') : NULL;
    size_t plen = slash ? (size_t)(slash - a->entries[0].name) + 1 : 0;
    a->prefix = malloc(plen + 1);
    if (!a->prefix) {
        tz_free(a);
        return ds_fail(err, DS_ERR_NOMEM, "out of memory");
    }
    if (plen)
        memcpy(a->prefix, a->entries[0].name, plen);
    a->prefix[plen] = 0;
    a->prefix_len = plen;
    return 0;
fail:
    free(cd);
    tz_free(a);
    return -1;
}

const tz_entry *tz_find(const tz_archive *a, const char *rel) {
    if (!a->index_cap)
        return NULL;
    size_t rl = strlen(rel);
    size_t slot = (size_t)name_hash(a->prefix, a->prefix_len, rel, rl) & (a->index_cap - 1);
    while (a->index[slot]) {
        const tz_entry *e = &a->entries[a->index[slot] - 1];
        if (e->name_len == a->prefix_len + rl && memcmp(e->name, a->prefix, a->prefix_len) == 0 &&
            memcmp(e->name + a->prefix_len, rel, rl) == 0)
            return e;
        slot = (slot + 1) & (a->index_cap - 1);
    }
    return NULL;
}
