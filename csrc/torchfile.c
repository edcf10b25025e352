/* torchfile.c: opening and validating a torch.save checkpoint (contract in torchfile.h). */
#include "torchfile.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void tf_close(tf_checkpoint *c) {
    if (c->opened)
        io_close(&c->f);
    tz_free(&c->zip);
    pk_free(&c->pk);
    free(c->storage_offset);
    free(c->storage_nbytes);
    memset(c, 0, sizeof *c);
}

/* A small text record of the archive (byteorder, version) into buf, or "" when absent. */
static int small_record(tf_checkpoint *c, const char *rel, char *buf, size_t cap, ds_error *err) {
    buf[0] = 0;
    const tz_entry *e = tz_find(&c->zip, rel);
    if (!e)
        return 0;
    if (e->method != 0)
        return ds_fail(err, DS_ERR_FORMAT, "zip entry '%.200s' is compressed (method %d)", e->name, e->method);
    size_t n = e->size < cap - 1 ? (size_t)e->size : cap - 1;
    if (io_pread(c->f.fd, buf, n, e->offset, err))
        return -1;
    buf[n] = 0;
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
        buf[--n] = 0;
    return 0;
}

/* Checks that a tensor's elements (offset, size, stride) lie inside its storage. */
static int check_tensor(const pk_tensor *t, uint64_t storage_bytes, size_t which, ds_error *err) {
    uint64_t es = pk_dtype_size(t->dtype), last = t->offset, numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        if (t->size[d] == 0)
            numel = 0;
        else if (numel) {
            if (t->stride[d] && (t->size[d] - 1) > (UINT64_MAX - last) / t->stride[d])
                return ds_fail(err, DS_ERR_FORMAT, "tensor %zu: its strides overflow", which);
            last += (t->size[d] - 1) * t->stride[d];
            numel *= t->size[d];
        }
    }
    if (numel == 0)
        return 0;
    if (last >= UINT64_MAX / es || (last + 1) * es > storage_bytes)
        return ds_fail(err, DS_ERR_FORMAT,
                       "tensor %zu needs %llu bytes of storage '%.100s' (offset %llu elements), which holds %llu",
                       which, (unsigned long long)((last + 1) * es), t->storage->u.storage.key,
                       (unsigned long long)t->offset, (unsigned long long)storage_bytes);
    return 0;
}

/* Checks every tensor reachable from o once (seen: one mark per object id); containers nested
 * deeper than 1000 are refused. */
static int check_tree(const pk_obj *o, const tf_checkpoint *c, uint8_t *seen, size_t *count, int depth, ds_error *err) {
    if (seen[o->id])
        return 0;
    seen[o->id] = 1;
    if (depth > 1000)
        return ds_fail(err, DS_ERR_FORMAT, "data.pkl nests containers more than 1000 deep");
    switch (o->kind) {
    case PK_TENSOR: {
        const pk_tensor *t = o->u.tensor;
        if (t->storage->u.storage.dtype != PK_UNTYPED && t->storage->u.storage.dtype != t->dtype)
            return ds_fail(err, DS_ERR_FORMAT, "tensor %zu is not of its storage's dtype", *count);
        if (check_tensor(t, c->storage_nbytes[t->storage->u.storage.index], (*count)++, err))
            return -1;
        if (t->metadata && check_tree(t->metadata, c, seen, count, depth + 1, err))
            return -1;
        return t->state ? check_tree(t->state, c, seen, count, depth + 1, err) : 0;
    }
    case PK_TUPLE:
    case PK_LIST:
    case PK_DICT:
    case PK_ODICT:
        for (size_t i = 0; i < o->u.seq.n; i++)
            if (check_tree(o->u.seq.v[i], c, seen, count, depth + 1, err))
                return -1;
        return o->state ? check_tree(o->state, c, seen, count, depth + 1, err) : 0;
    case PK_STORAGE: return ds_fail(err, DS_ERR_UNSUPPORTED, "data.pkl holds a bare storage");
    case PK_GLOBAL: return ds_fail(err, DS_ERR_UNSUPPORTED, "data.pkl holds a class or dtype as a value");
    default: return 0;
    }
}

int tf_open(const char *path, const pk_options *opt, tf_checkpoint *c, ds_error *err) {
    memset(c, 0, sizeof *c);
    if (io_open(path, &c->f, err))
        return -1;
    c->opened = 1;
    if (tz_open(c->f.fd, c->f.size, &c->zip, err))
        goto fail;
    char rec[64];
    if (small_record(c, "byteorder", rec, sizeof rec, err))
        goto fail;
    if (rec[0] && strcmp(rec, "little") != 0) {
        ds_fail(err, DS_ERR_UNSUPPORTED, "the checkpoint's byte order is '%.20s'", rec);
        goto fail;
    }
    const tz_entry *pkl = tz_find(&c->zip, "data.pkl");
    if (!pkl) {
        ds_fail(err, DS_ERR_UNSUPPORTED, "a zip archive without data.pkl (not a torch.save checkpoint)");
        goto fail;
    }
    /* the format version, as torch's reader checks it: "version" (or ".data/version") holds a
     * decimal number from 1 to 10, leading blanks and trailing text ignored */
    const char *vrel = tz_find(&c->zip, "version") ? "version" : ".data/version";
    if (!tz_find(&c->zip, vrel)) {
        ds_fail(err, DS_ERR_FORMAT, "the archive has no version record (torch.load refuses it too)");
        goto fail;
    }
    if (small_record(c, vrel, rec, sizeof rec, err))
        goto fail;
    char *vend = NULL;
    long long version = strtoll(rec, &vend, 10);
    if (vend == rec) {
        ds_fail(err, DS_ERR_FORMAT, "the archive's version record '%.20s' is not a number", rec);
        goto fail;
    }
    if (version < TF_MIN_VERSION || version > TF_MAX_VERSION) {
        ds_fail(err, DS_ERR_FORMAT, "the archive's format version %lld is outside what torch.load reads (%d to %d)",
                version, TF_MIN_VERSION, TF_MAX_VERSION);
        goto fail;
    }
    if (pkl->method != 0) {
        ds_fail(err, DS_ERR_FORMAT, "zip entry '%.200s' is compressed (method %d): torch never compresses", pkl->name,
                pkl->method);
        goto fail;
    }
    if (pkl->size > TF_MAX_PICKLE) {
        ds_fail(err, DS_ERR_FORMAT, "data.pkl is %llu bytes, over the limit of %llu", (unsigned long long)pkl->size,
                (unsigned long long)TF_MAX_PICKLE);
        goto fail;
    }
    uint8_t *buf = malloc(pkl->size ? (size_t)pkl->size : 1);
    if (!buf) {
        ds_fail(err, DS_ERR_NOMEM, "out of memory for data.pkl (%llu bytes)", (unsigned long long)pkl->size);
        goto fail;
    }
    int rc = io_pread(c->f.fd, buf, (size_t)pkl->size, pkl->offset, err);
    if (!rc)
        rc = pk_run(buf, (size_t)pkl->size, opt, &c->pk, err);
    free(buf);
    if (rc)
        goto fail;
    size_t n = c->pk.n_storages;
    c->storage_offset = calloc(n ? n : 1, sizeof *c->storage_offset);
    c->storage_nbytes = calloc(n ? n : 1, sizeof *c->storage_nbytes);
    if (!c->storage_offset || !c->storage_nbytes) {
        ds_fail(err, DS_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < n; i++) {
        const pk_storage *s = &c->pk.storages[i]->u.storage;
        char rel[300];
        snprintf(rel, sizeof rel, "data/%.280s", s->key);
        const tz_entry *e = tz_find(&c->zip, rel);
        if (!e) {
            ds_fail(err, DS_ERR_FORMAT, "storage '%.100s' has no entry data/%.100s in the archive", s->key, s->key);
            goto fail;
        }
        if (e->method != 0) {
            ds_fail(err, DS_ERR_FORMAT, "zip entry '%.200s' is compressed (method %d): torch never compresses", e->name,
                    e->method);
            goto fail;
        }
        uint64_t es = pk_dtype_size(s->dtype);
        if (s->numel > UINT64_MAX / es || s->numel * es > e->size) {
            ds_fail(err, DS_ERR_FORMAT,
                    "storage '%.100s' claims %llu elements of %llu bytes but its entry holds %llu bytes", s->key,
                    (unsigned long long)s->numel, (unsigned long long)es, (unsigned long long)e->size);
            goto fail;
        }
        c->storage_offset[i] = e->offset;
        c->storage_nbytes[i] = s->numel * es;
    }
    size_t count = 0;
    uint8_t *seen = calloc(c->pk.n_objs ? c->pk.n_objs : 1, 1);
    if (!seen) {
        ds_fail(err, DS_ERR_NOMEM, "out of memory");
        goto fail;
    }
    rc = check_tree(c->pk.root, c, seen, &count, 0, err);
    free(seen);
    if (rc)
        goto fail;
    return 0;
fail:
    tf_close(c);
    return -1;
}
