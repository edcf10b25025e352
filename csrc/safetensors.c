/* safetensors.c: header parser and validator (contract in safetensors.h).
 *
 * Memory: every name, shape and metadata string lives in one arena of large
 * blocks owned by the st_header, so a header of a million tensors costs a few
 * allocations. Entries are gathered in file order, then sorted twice: by name
 * (keeping the last of duplicated names, as safetensors' HashMap does), and by
 * data_offsets for the checks that the data section is covered exactly once:
 * the first tensor starts at 0, each starts where the previous one ended, each
 * holds dtype bits x product(shape) / 8 bytes, and the last ends at the end of
 * the file. */
#include "safetensors.h"

#include "arena.h"
#include "lastwins.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

static char *arena_str(ds_arena_block **arena, const char *s, size_t n) {
    char *d = ds_arena_alloc(arena, n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

static const struct {
    const char *name;
    unsigned bits;
} DTYPES[ST_NDTYPES] = {
    [ST_BOOL] = {"BOOL", 8},
    [ST_U8] = {"U8", 8},
    [ST_I8] = {"I8", 8},
    [ST_F8_E5M2] = {"F8_E5M2", 8},
    [ST_F8_E4M3] = {"F8_E4M3", 8},
    [ST_F8_E8M0] = {"F8_E8M0", 8},
    [ST_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8},
    [ST_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8},
    [ST_I16] = {"I16", 16},
    [ST_U16] = {"U16", 16},
    [ST_F16] = {"F16", 16},
    [ST_BF16] = {"BF16", 16},
    [ST_I32] = {"I32", 32},
    [ST_U32] = {"U32", 32},
    [ST_F32] = {"F32", 32},
    [ST_C64] = {"C64", 64},
    [ST_F64] = {"F64", 64},
    [ST_I64] = {"I64", 64},
    [ST_U64] = {"U64", 64},
    [ST_F4] = {"F4", 4},
    [ST_F6_E2M3] = {"F6_E2M3", 6},
    [ST_F6_E3M2] = {"F6_E3M2", 6},
};

unsigned st_dtype_bits(st_dtype d) { return (unsigned)d < ST_NDTYPES ? DTYPES[d].bits : 0; }

const char *st_dtype_name(st_dtype d) { return (unsigned)d < ST_NDTYPES ? DTYPES[d].name : "?"; }

int st_check_prefix(const uint8_t prefix[8], uint64_t file_size, uint64_t *header_len, ds_error *err) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | prefix[i];
    if (n > ST_MAX_HEADER)
        return ds_fail(err, DS_ERR_FORMAT,
                       "header length %llu is over the format's limit of %llu bytes: "
                       "is this a safetensors file?",
                       (unsigned long long)n, (unsigned long long)ST_MAX_HEADER);
    if (file_size < 8 || n > file_size - 8)
        return ds_fail(err, DS_ERR_FORMAT,
                       "header length %llu runs past the end of the file (%llu bytes): "
                       "the file is truncated or not a safetensors file",
                       (unsigned long long)n, (unsigned long long)file_size);
    *header_len = n;
    return 0;
}

/* ---- parsing ---------------------------------------------------------- */

typedef struct {
    st_tensor t;
    size_t seq; /* position in the file, to keep the last of duplicated names */
} entry;

typedef struct {
    st_meta m;
    size_t seq;
} meta_entry;

typedef struct {
    js_cursor c;
    js_buf key, tmp;
    ds_arena_block *arena;
    entry *entries;
    size_t n_entries, cap_entries;
    meta_entry *meta;
    size_t n_meta, cap_meta;
    uint64_t *dims; /* scratch for one shape */
    size_t cap_dims;
    ds_error *err;
} parser;

static int nomem(parser *ps) { return ds_fail(ps->err, DS_ERR_NOMEM, "out of memory while parsing the header"); }

static int grow(void **arr, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap * 2 : 64;
    while (c < need)
        c *= 2;
    if (c > SIZE_MAX / elem)
        return -1;
    void *p = realloc(*arr, c * elem);
    if (!p)
        return -1;
    *arr = p;
    *cap = c;
    return 0;
}

/* Writes "[a, b, c]" into out (truncated with "..." when long). */
static void fmt_shape(char *out, size_t cap, const uint64_t *shape, int ndim) {
    size_t n = 0;
    n += (size_t)snprintf(out + n, cap - n, "[");
    for (int i = 0; i < ndim && n < cap; i++) {
        if (n > cap - 32) {
            snprintf(out + n, cap - n, "...");
            return;
        }
        n += (size_t)snprintf(out + n, cap - n, i ? ", %llu" : "%llu", (unsigned long long)shape[i]);
    }
    if (n < cap)
        snprintf(out + n, cap - n, "]");
}

static int dtype_lookup(parser *ps, const char *name, st_dtype *out) {
    for (int d = 0; d < ST_NDTYPES; d++)
        if (strlen(DTYPES[d].name) == ps->tmp.len && memcmp(DTYPES[d].name, ps->tmp.data, ps->tmp.len) == 0) {
            *out = (st_dtype)d;
            return 0;
        }
    return ds_fail(ps->err, DS_ERR_FORMAT,
                   "tensor '%.200s': unknown dtype \"%.40s\" (the format knows BOOL, U8, I8, I16, U16, I32, "
                   "U32, I64, U64, F16, BF16, F32, F64, C64, F8_E4M3, F8_E5M2, F8_E8M0, F8_E4M3FNUZ, "
                   "F8_E5M2FNUZ, F4, F6_E2M3, F6_E3M2)",
                   name, ps->tmp.data);
}

static int parse_dtype(parser *ps, const char *name, st_dtype *out) {
    js_cursor *c = &ps->c;
    size_t i = 0;
    int more;
    if (js_peek(c) == '"')
        return js_string(c, &ps->tmp) || dtype_lookup(ps, name, out);
    if (js_peek(c) != '{')
        return js_error(c, "tensor '%.200s': dtype must be a string, found %s", name, js_kind(c));
    /* serde also reads a unit enum variant written as {"F32": null} */
    if (js_enter(c, '{') || js_next(c, '}', &i, &more))
        return -1;
    if (!more)
        return js_error(c, "tensor '%.200s': dtype must be a string, found an empty object", name);
    if (js_string(c, &ps->tmp) || js_colon(c) || dtype_lookup(ps, name, out))
        return -1;
    if (js_peek(c) != 'n')
        return js_error(c, "tensor '%.200s': dtype written as an object must map the name to null", name);
    if (js_skip_value(c) || js_next(c, '}', &i, &more))
        return -1;
    if (more)
        return js_error(c, "tensor '%.200s': dtype written as an object must hold a single key", name);
    return 0;
}

static int parse_shape(parser *ps, const char *name, st_tensor *t) {
    js_cursor *c = &ps->c;
    size_t i = 0;
    int more;
    if (js_peek(c) != '[')
        return js_error(c, "tensor '%.200s': shape must be an array of integers, found %s", name, js_kind(c));
    if (js_enter(c, '['))
        return -1;
    for (;;) {
        if (js_next(c, ']', &i, &more))
            return -1;
        if (!more)
            break;
        if (grow((void **)&ps->dims, &ps->cap_dims, i, sizeof(uint64_t)))
            return nomem(ps);
        if (js_u64(c, &ps->dims[i - 1], "tensor", name, "a shape dimension"))
            return -1;
    }
    uint64_t *shape = ds_arena_alloc(&ps->arena, i * sizeof(uint64_t) + 1);
    if (!shape)
        return nomem(ps);
    if (i)
        memcpy(shape, ps->dims, i * sizeof(uint64_t));
    t->shape = shape;
    t->ndim = (int)i;
    return 0;
}

static int parse_offsets(parser *ps, const char *name, st_tensor *t) {
    js_cursor *c = &ps->c;
    size_t i = 0;
    int more;
    uint64_t v[2] = {0, 0};
    if (js_peek(c) != '[')
        return js_error(c, "tensor '%.200s': data_offsets must be an array [begin, end], found %s", name, js_kind(c));
    if (js_enter(c, '['))
        return -1;
    for (;;) {
        if (js_next(c, ']', &i, &more))
            return -1;
        if (!more)
            break;
        if (i > 2)
            return js_error(c, "tensor '%.200s': data_offsets must hold 2 integers, found more", name);
        if (js_u64(c, &v[i - 1], "tensor", name, "data_offsets"))
            return -1;
    }
    if (i != 2)
        return js_error(c, "tensor '%.200s': data_offsets must hold 2 integers, found %zu", name, i);
    t->begin = v[0];
    t->end = v[1];
    return 0;
}

static int parse_tensor(parser *ps, const char *name, st_tensor *t) {
    js_cursor *c = &ps->c;
    size_t i = 0;
    int more;
    int ch = js_peek(c);
    if (ch == '[') {
        /* serde also accepts a struct as the sequence of its fields */
        if (js_enter(c, '['))
            return -1;
        for (;;) {
            if (js_next(c, ']', &i, &more))
                return -1;
            if (!more)
                break;
            int r = i == 1   ? parse_dtype(ps, name, &t->dtype)
                    : i == 2 ? parse_shape(ps, name, t)
                    : i == 3 ? parse_offsets(ps, name, t)
                             : js_error(c, "tensor '%.200s': the array form holds 3 fields, found more", name);
            if (r)
                return -1;
        }
        if (i != 3)
            return js_error(c,
                            "tensor '%.200s': the array form must hold dtype, shape and data_offsets, found %zu "
                            "elements",
                            name, i);
        return 0;
    }
    if (ch != '{')
        return js_error(c, "tensor '%.200s': expected an object {dtype, shape, data_offsets}, found %s", name,
                        js_kind(c));
    if (js_enter(c, '{'))
        return -1;
    int seen[3] = {0, 0, 0};
    static const char *const fields[3] = {"dtype", "shape", "data_offsets"};
    for (;;) {
        if (js_next(c, '}', &i, &more))
            return -1;
        if (!more)
            break;
        if (js_string(c, &ps->tmp) || js_colon(c))
            return -1;
        int f = -1;
        for (int k = 0; k < 3; k++)
            if (strlen(fields[k]) == ps->tmp.len && memcmp(fields[k], ps->tmp.data, ps->tmp.len) == 0)
                f = k;
        if (f < 0) {
            if (js_skip_value(c)) /* unknown fields are ignored, as serde does */
                return -1;
            continue;
        }
        if (seen[f])
            return js_error(c, "tensor '%.200s': duplicate field \"%s\"", name, fields[f]);
        seen[f] = 1;
        int r = f == 0   ? parse_dtype(ps, name, &t->dtype)
                : f == 1 ? parse_shape(ps, name, t)
                         : parse_offsets(ps, name, t);
        if (r)
            return -1;
    }
    for (int k = 0; k < 3; k++)
        if (!seen[k])
            return js_error(c, "tensor '%.200s': missing field \"%s\"", name, fields[k]);
    return 0;
}

static int parse_metadata(parser *ps) {
    js_cursor *c = &ps->c;
    size_t i = 0;
    int more;
    if (js_peek(c) == 'n')
        return js_skip_value(c); /* null: no metadata */
    if (js_peek(c) != '{')
        return js_error(c, "\"__metadata__\" must be an object of strings, found %s", js_kind(c));
    if (js_enter(c, '{'))
        return -1;
    for (;;) {
        if (js_next(c, '}', &i, &more))
            return -1;
        if (!more)
            return 0;
        if (js_string(c, &ps->key) || js_colon(c))
            return -1;
        if (js_peek(c) != '"')
            return js_error(c, "\"__metadata__\" value of \"%.100s\" must be a string, found %s", ps->key.data,
                            js_kind(c));
        if (js_string(c, &ps->tmp))
            return -1;
        if (grow((void **)&ps->meta, &ps->cap_meta, ps->n_meta + 1, sizeof(meta_entry)))
            return nomem(ps);
        meta_entry *m = &ps->meta[ps->n_meta];
        m->m.key = arena_str(&ps->arena, ps->key.data, ps->key.len);
        m->m.value = arena_str(&ps->arena, ps->tmp.data, ps->tmp.len);
        if (!m->m.key || !m->m.value)
            return nomem(ps);
        m->m.key_len = ps->key.len;
        m->m.value_len = ps->tmp.len;
        m->seq = ps->n_meta++;
    }
}

static int bytes_cmp(const char *a, size_t an, const char *b, size_t bn) {
    int r = memcmp(a, b, an < bn ? an : bn);
    if (r)
        return r;
    return an < bn ? -1 : an > bn;
}

static int entry_by_name(const void *x, const void *y) {
    const entry *a = x, *b = y;
    int r = bytes_cmp(a->t.name, a->t.name_len, b->t.name, b->t.name_len);
    if (r)
        return r;
    return a->seq < b->seq ? -1 : a->seq > b->seq;
}

static int entry_same_name(const void *x, const void *y) {
    const entry *a = x, *b = y;
    return a->t.name_len == b->t.name_len && memcmp(a->t.name, b->t.name, a->t.name_len) == 0;
}

static int meta_same_key(const void *x, const void *y) {
    const meta_entry *a = x, *b = y;
    return a->m.key_len == b->m.key_len && memcmp(a->m.key, b->m.key, a->m.key_len) == 0;
}

static int meta_by_key(const void *x, const void *y) {
    const meta_entry *a = x, *b = y;
    int r = bytes_cmp(a->m.key, a->m.key_len, b->m.key, b->m.key_len);
    if (r)
        return r;
    return a->seq < b->seq ? -1 : a->seq > b->seq;
}

static int tensor_by_offsets(const void *x, const void *y) {
    const st_tensor *a = *(const st_tensor *const *)x, *b = *(const st_tensor *const *)y;
    if (a->begin != b->begin)
        return a->begin < b->begin ? -1 : 1;
    if (a->end != b->end)
        return a->end < b->end ? -1 : 1;
    return 0;
}

/* The checks of safetensors' Metadata::validate, in its order, with messages
 * that say what is wrong. Sets *data_len to the end of the last tensor. */
static int validate(st_header *h, uint64_t file_size, ds_error *err) {
    int rc = -1;
    const st_tensor **order = NULL;
    char shp[200];
    if (h->n_tensors) {
        order = malloc(h->n_tensors * sizeof *order);
        if (!order)
            return ds_fail(err, DS_ERR_NOMEM, "out of memory while validating the header");
    }
    for (size_t i = 0; i < h->n_tensors; i++)
        order[i] = &h->tensors[i];
    int sorted = 1;
    for (size_t i = 1; i < h->n_tensors && sorted; i++)
        sorted = tensor_by_offsets(&order[i - 1], &order[i]) <= 0;
    if (!sorted)
        qsort(order, h->n_tensors, sizeof *order, tensor_by_offsets);
    uint64_t start = 0;
    const st_tensor *prev = NULL;
    for (size_t i = 0; i < h->n_tensors; i++) {
        const st_tensor *t = order[i];
        if (t->end < t->begin) {
            ds_fail(err, DS_ERR_FORMAT, "tensor '%.200s': data_offsets [%llu, %llu) end before they begin", t->name,
                    (unsigned long long)t->begin, (unsigned long long)t->end);
            goto done;
        }
        if (t->begin > start) {
            ds_fail(err, DS_ERR_FORMAT,
                    "tensor '%.200s': data_offsets [%llu, %llu) leave a hole of %llu bytes after byte %llu of "
                    "the data section (each tensor must start where the previous one ends)",
                    t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
                    (unsigned long long)(t->begin - start), (unsigned long long)start);
            goto done;
        }
        if (t->begin < start) {
            ds_fail(err, DS_ERR_FORMAT,
                    "tensor '%.200s': data_offsets [%llu, %llu) overlap tensor '%.200s', which ends at byte %llu",
                    t->name, (unsigned long long)t->begin, (unsigned long long)t->end, prev ? prev->name : "?",
                    (unsigned long long)start);
            goto done;
        }
        start = t->end;
        prev = t;
        uint64_t numel = 1;
        int over = 0;
        for (int d = 0; d < t->ndim && !over; d++)
            over = __builtin_mul_overflow(numel, t->shape[d], &numel);
        /* torch's sizes are int64: a zero elsewhere in the shape keeps the product small */
        for (int d = 0; d < t->ndim && !over; d++)
            over = t->shape[d] > (uint64_t)INT64_MAX;
        uint64_t bits = 0;
        over = over || __builtin_mul_overflow(numel, (uint64_t)DTYPES[t->dtype].bits, &bits);
        if (over || bits % 8 || t->end - t->begin != bits / 8)
            fmt_shape(shp, sizeof shp, t->shape, t->ndim);
        if (over) {
            ds_fail(err, DS_ERR_FORMAT, "tensor '%.200s': shape %s of dtype %s overflows 64-bit sizes", t->name, shp,
                    DTYPES[t->dtype].name);
            goto done;
        }
        if (bits % 8) {
            ds_fail(err, DS_ERR_FORMAT, "tensor '%.200s': shape %s of dtype %s is not a whole number of bytes", t->name,
                    shp, DTYPES[t->dtype].name);
            goto done;
        }
        if (t->end - t->begin != bits / 8) {
            ds_fail(err, DS_ERR_FORMAT,
                    "tensor '%.200s': dtype %s and shape %s need %llu bytes, but data_offsets [%llu, %llu) "
                    "hold %llu",
                    t->name, DTYPES[t->dtype].name, shp, (unsigned long long)(bits / 8), (unsigned long long)t->begin,
                    (unsigned long long)t->end, (unsigned long long)(t->end - t->begin));
            goto done;
        }
    }
    h->data_len = start;
    if (file_size - h->data_start != start) {
        if (file_size - h->data_start < start)
            ds_fail(err, DS_ERR_FORMAT,
                    "file is truncated: the header's tensors need %llu bytes of data (to tensor '%.200s'), the "
                    "file holds %llu",
                    (unsigned long long)start, prev ? prev->name : "?",
                    (unsigned long long)(file_size - h->data_start));
        else
            ds_fail(err, DS_ERR_FORMAT,
                    "%llu bytes follow the last tensor's data (the header's tensors cover %llu of %llu data "
                    "bytes): the file is corrupt or was written wrongly",
                    (unsigned long long)(file_size - h->data_start - start), (unsigned long long)start,
                    (unsigned long long)(file_size - h->data_start));
        goto done;
    }
    rc = 0;
done:
    free(order);
    return rc;
}

int st_parse(const uint8_t *json, size_t json_len, uint64_t file_size, st_header *h, ds_error *err) {
    parser ps;
    int rc = -1;
    memset(h, 0, sizeof *h);
    memset(&ps, 0, sizeof ps);
    ps.err = err;
    h->header_len = json_len;
    h->data_start = 8 + (uint64_t)json_len;
    if (h->data_start > file_size) {
        ds_fail(err, DS_ERR_FORMAT, "header length %zu runs past the end of the file (%llu bytes)", json_len,
                (unsigned long long)file_size);
        return -1;
    }
    size_t bad = js_utf8_check(json, json_len);
    if (bad != json_len) {
        ds_fail(err, DS_ERR_FORMAT, "invalid UTF-8 in header at byte %zu: is this a safetensors file?", bad);
        return -1;
    }
    js_init(&ps.c, json, json_len, "header", err);
    js_cursor *c = &ps.c;
    int seen_meta = 0;
    size_t i = 0;
    int more;
    if (js_peek(c) != '{') {
        js_error(c, "the header must be a JSON object, found %s: is this a safetensors file?", js_kind(c));
        goto done;
    }
    if (js_enter(c, '{'))
        goto done;
    for (;;) {
        if (js_next(c, '}', &i, &more))
            goto done;
        if (!more)
            break;
        if (js_string(c, &ps.key) || js_colon(c))
            goto done;
        if (ps.key.len == 12 && memcmp(ps.key.data, "__metadata__", 12) == 0) {
            if (seen_meta) {
                js_error(c, "duplicate \"__metadata__\"");
                goto done;
            }
            seen_meta = 1;
            h->has_metadata = js_peek(c) != 'n';
            if (parse_metadata(&ps))
                goto done;
            continue;
        }
        if (grow((void **)&ps.entries, &ps.cap_entries, ps.n_entries + 1, sizeof(entry))) {
            nomem(&ps);
            goto done;
        }
        entry *e = &ps.entries[ps.n_entries];
        memset(e, 0, sizeof *e);
        e->t.name = arena_str(&ps.arena, ps.key.data, ps.key.len);
        if (!e->t.name) {
            nomem(&ps);
            goto done;
        }
        e->t.name_len = ps.key.len;
        e->seq = ps.n_entries;
        if (parse_tensor(&ps, e->t.name, &e->t))
            goto done;
        ps.n_entries++;
    }
    if (js_finish(c))
        goto done;

    /* Names: sorted bytewise; a repeated name keeps its last entry (lastwins.h). */
    size_t n_tensors = lw_sort_keep_last(ps.entries, ps.n_entries, sizeof(entry), entry_by_name, entry_same_name);
    h->tensors = malloc((n_tensors ? n_tensors : 1) * sizeof(st_tensor));
    if (!h->tensors) {
        nomem(&ps);
        goto done;
    }
    for (size_t k = 0; k < n_tensors; k++)
        h->tensors[h->n_tensors++] = ps.entries[k].t;
    size_t n_meta = lw_sort_keep_last(ps.meta, ps.n_meta, sizeof(meta_entry), meta_by_key, meta_same_key);
    h->meta = malloc((n_meta ? n_meta : 1) * sizeof(st_meta));
    if (!h->meta) {
        nomem(&ps);
        goto done;
    }
    for (size_t k = 0; k < n_meta; k++)
        h->meta[h->n_meta++] = ps.meta[k].m;
    h->arena = ps.arena;
    ps.arena = NULL;
    if (validate(h, file_size, err))
        goto done;
    rc = 0;
done:
    if (rc)
        st_free(h);
    ds_arena_free(&ps.arena);
    free(ps.entries);
    free(ps.meta);
    free(ps.dims);
    js_buf_free(&ps.key);
    js_buf_free(&ps.tmp);
    return rc;
}

void st_free(st_header *h) {
    free(h->tensors);
    free(h->meta);
    ds_arena_free(&h->arena);
    memset(h, 0, sizeof *h);
}

const st_tensor *st_find(const st_header *h, const char *name, size_t name_len) {
    size_t lo = 0, hi = h->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int r = bytes_cmp(h->tensors[mid].name, h->tensors[mid].name_len, name, name_len);
        if (r == 0)
            return &h->tensors[mid];
        if (r < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}
