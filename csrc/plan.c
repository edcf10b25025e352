/* plan.c: the load planner (contract and layout in plan.h). No Python: every function here runs
 * with the GIL released, and the bindings turn its ds_error into an exception.
 *
 * A load runs in three steps: open every file, read and validate its header and plan its tasks
 * (populate the mapping's pages, or read into anonymous memory, or convert dtypes into anonymous
 * memory); run the tasks on worker threads (io_run, plan_run_task); then the binding builds the
 * Tensor objects in the order of safe_open().keys() (names sorted bytewise). */
#include "plan.h"

#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "keyhash.h"
#include "lastwins.h"
#include "lease.h"

/* Opens path and parses its safetensors header into h (file left open in f).
 * Runs without the GIL. */
int plan_open_header(const char *path, io_file *f, st_header *h, ds_error *err) {
    memset(h, 0, sizeof *h);
    if (io_open(path, f, err))
        return -1;
    if (plan_parse_header(f, h, err)) {
        io_close(f);
        return -1;
    }
    return 0;
}

int plan_parse_header(const io_file *f, st_header *h, ds_error *err) {
    uint8_t prefix[8];
    uint64_t n;
    memset(h, 0, sizeof *h);
    if (f->size < 8) {
        ds_fail(err, DS_ERR_FORMAT,
                "the file holds %llu bytes, fewer than the 8-byte header length: is this a safetensors file?",
                (unsigned long long)f->size);
        goto fail;
    }
    if (io_pread(f->fd, prefix, 8, 0, err) || st_check_prefix(prefix, f->size, &n, err))
        goto fail;
    uint8_t *json = malloc(n ? (size_t)n : 1);
    if (!json) {
        ds_fail(err, DS_ERR_NOMEM, "cannot allocate %llu bytes for the header", (unsigned long long)n);
        goto fail;
    }
    if (io_pread(f->fd, json, (size_t)n, 8, err)) {
        free(json);
        goto fail;
    }
    int rc = st_parse(json, (size_t)n, f->size, h, err);
    free(json);
    return rc ? -1 : 0;
fail:
    return -1;
}

typedef struct {
    const char *const *paths;
    io_file *files;
    st_header *headers;
    int *opened;
} header_job;

static int header_task(void *ctx, size_t i, ds_error *err) {
    header_job *job = ctx;
    if (plan_open_header(job->paths[i], &job->files[i], &job->headers[i], err)) {
        err->input = (int)i;
        return -1;
    }
    job->opened[i] = 1;
    return 0;
}

/* Opens and parses the headers of n files on up to `threads` threads. On
 * failure the files opened so far stay open (opened[i] set) for the caller to
 * close, and err->input names the failing file. Runs without the GIL. */
int plan_open_headers(const char *const *paths, size_t n, io_file *files, st_header *headers, int *opened, int threads,
                      ds_error *err) {
    header_job job = {paths, files, headers, opened};
    return io_run(n, threads, header_task, &job, NULL, NULL, err);
}
typedef struct {
    const st_tensor *t;
    size_t file;
} merged_entry;

/* Orders tensors by name, bytewise (a shorter name first when one is a prefix of the other). */
static int name_cmp(const st_tensor *a, const st_tensor *b) {
    size_t n = a->name_len < b->name_len ? a->name_len : b->name_len;
    int r = memcmp(a->name, b->name, n);
    if (r)
        return r;
    return a->name_len < b->name_len ? -1 : a->name_len > b->name_len;
}

static int merged_cmp(const void *x, const void *y) {
    const merged_entry *a = x, *b = y;
    int r = name_cmp(a->t, b->t);
    if (r)
        return r;
    return a->file < b->file ? -1 : a->file > b->file;
}

static int merged_same(const void *x, const void *y) {
    const merged_entry *a = x, *b = y;
    return a->t->name_len == b->t->name_len && memcmp(a->t->name, b->t->name, a->t->name_len) == 0;
}

/* The hash of the union of several headers (a later file's entry replaces an
 * earlier one of the same name, as dict.update does). Runs without the GIL. */
int plan_hash_headers(st_header *hs, size_t n_files, int with_shape, char hex[33], ds_error *err) {
    size_t total = 0;
    for (size_t i = 0; i < n_files; i++)
        total += hs[i].n_tensors;
    merged_entry *all = malloc((total ? total : 1) * sizeof *all);
    kh_entry *entries = malloc((total ? total : 1) * sizeof *entries);
    if (!all || !entries) {
        free(all);
        free(entries);
        return ds_fail(err, DS_ERR_NOMEM, "out of memory while hashing %zu keys", total);
    }
    size_t k = 0;
    for (size_t i = 0; i < n_files; i++)
        for (size_t j = 0; j < hs[i].n_tensors; j++) {
            all[k].t = &hs[i].tensors[j];
            all[k].file = i;
            k++;
        }
    size_t n = lw_sort_keep_last(all, total, sizeof *all, merged_cmp, merged_same);
    for (size_t i = 0; i < n; i++) {
        entries[i].key = all[i].t->name;
        entries[i].key_len = all[i].t->name_len;
        entries[i].ndim = all[i].t->ndim;
        entries[i].shape = all[i].t->shape;
        entries[i].nested = NULL;
        entries[i].nested_len = 0;
    }
    char *s;
    size_t len;
    int rc = kh_keys_string(entries, n, with_shape, &s, &len, err);
    if (!rc) {
        kh_md5_hex(s, len, hex);
        free(s);
    }
    free(all);
    free(entries);
    return rc;
}
/* ---- buffer layout (contract in plan.h) ------------------------------------------------------ */

typedef struct {
    const st_tensor *t;
    size_t file, tensor, seq; /* seq: the order in which the files list it */
} layout_entry;

static int layout_name_seq_cmp(const void *x, const void *y) {
    const layout_entry *a = x, *b = y;
    int r = name_cmp(a->t, b->t);
    if (r)
        return r;
    return a->seq < b->seq ? -1 : a->seq > b->seq;
}

static int layout_seq_cmp(const void *x, const void *y) {
    const layout_entry *a = x, *b = y;
    return a->seq < b->seq ? -1 : a->seq > b->seq;
}

/* x rounded up to a multiple of align (a power of two) into *out; -1 on overflow. */
static int align_up(uint64_t x, uint64_t align, uint64_t *out) {
    if (x > UINT64_MAX - (align - 1))
        return -1;
    *out = (x + (align - 1)) & ~(align - 1);
    return 0;
}

static int add_buffer(plan_layout *l, size_t *cap, unsigned reader, size_t file, ds_error *err) {
    if (l->n_buffers == *cap) {
        size_t c = *cap ? *cap * 2 : 16;
        plan_buffer *b = realloc(l->buffers, c * sizeof *b);
        if (!b)
            return ds_fail(err, DS_ERR_NOMEM, "out of memory while laying out buffers");
        l->buffers = b;
        *cap = c;
    }
    l->buffers[l->n_buffers++] = (plan_buffer){0, reader, file};
    return 0;
}

/* Places item it (out_nbytes set) at the end of buffer b. Returns 0, or -1 when the buffer's size
 * would overflow. */
static int place(plan_layout *l, plan_item *it, size_t b, uint64_t align) {
    uint64_t padded;
    plan_buffer *buf = &l->buffers[b];
    if (align_up(it->out_nbytes, align, &padded) || padded > UINT64_MAX - buf->nbytes)
        return -1;
    it->buffer = b;
    it->buffer_offset = buf->nbytes;
    buf->nbytes += padded;
    return 0;
}

int plan_layout_build(const st_header *hs, size_t n, const plan_layout_spec *spec, plan_layout *out, ds_error *err) {
    memset(out, 0, sizeof *out);
    layout_entry *all = NULL;
    size_t *open_bucket = NULL, cap_buffers = 0, total = 0, kept = 0;
    uint64_t align = spec->align;
    if (align == 0 || (align & (align - 1)))
        return ds_fail(err, DS_ERR_UNSUPPORTED, "the alignment %llu is not a power of two", (unsigned long long)align);
    if (spec->split == PLAN_BUCKETS && spec->readers == 0)
        return ds_fail(err, DS_ERR_UNSUPPORTED, "a bucketed layout needs at least one reader");
    for (size_t i = 0; i < n; i++) {
        if (hs[i].n_tensors > SIZE_MAX / sizeof *all - total)
            return ds_fail(err, DS_ERR_NOMEM, "too many tensors");
        total += hs[i].n_tensors;
    }
    all = malloc((total ? total : 1) * sizeof *all);
    if (!all) {
        ds_fail(err, DS_ERR_NOMEM, "out of memory while laying out %zu tensors", total);
        goto fail;
    }
    for (size_t i = 0, k = 0; i < n; i++)
        for (size_t j = 0; j < hs[i].n_tensors; j++, k++)
            all[k] = (layout_entry){&hs[i].tensors[j], i, j, k};
    kept = total;
    if (spec->merge && total) {
        /* each name's last entry wins and takes the first entry's place in the order */
        qsort(all, total, sizeof *all, layout_name_seq_cmp);
        kept = 0;
        for (size_t g = 0; g < total;) {
            size_t e = g + 1;
            while (e < total && all[e].t->name_len == all[g].t->name_len &&
                   memcmp(all[e].t->name, all[g].t->name, all[g].t->name_len) == 0)
                e++;
            layout_entry w = all[e - 1];
            w.seq = all[g].seq;
            all[kept++] = w;
            g = e;
        }
        qsort(all, kept, sizeof *all, layout_seq_cmp);
    }
    out->items = malloc((kept ? kept : 1) * sizeof *out->items);
    if (!out->items) {
        ds_fail(err, DS_ERR_NOMEM, "out of memory while laying out %zu tensors", kept);
        goto fail;
    }
    out->n_items = kept;
    uint64_t sum = 0; /* bytes read, for the readers' shares */
    for (size_t k = 0; k < kept; k++) {
        const st_tensor *t = all[k].t;
        const st_header *h = &hs[all[k].file];
        plan_item *it = &out->items[k];
        it->file = all[k].file;
        it->tensor = all[k].tensor;
        if (t->end < t->begin || h->data_start > UINT64_MAX - t->end) {
            ds_fail(err, DS_ERR_FORMAT, "tensor '%.200s': data_offsets [%llu, %llu) are not a byte range", t->name,
                    (unsigned long long)t->begin, (unsigned long long)t->end);
            err->input = (int)it->file;
            goto fail;
        }
        it->offset = h->data_start + t->begin;
        it->nbytes = t->end - t->begin;
        it->from = it->to = t->dtype;
        it->out_nbytes = it->nbytes;
        it->buffer = SIZE_MAX;
        if (spec->convert && t->dtype != spec->target && (spec->convert & (1u << t->dtype)) &&
            !(spec->converted_only && it->nbytes == 0)) {
            uint64_t fb = st_dtype_bits(t->dtype) / 8, tb = st_dtype_bits(spec->target) / 8;
            if (fb == 0 || tb == 0 || it->nbytes % fb || it->nbytes / fb > UINT64_MAX / tb) {
                ds_fail(err, DS_ERR_FORMAT, "tensor '%.200s': %llu bytes of %s do not convert to %s", t->name,
                        (unsigned long long)it->nbytes, st_dtype_name(t->dtype), st_dtype_name(spec->target));
                err->input = (int)it->file;
                goto fail;
            }
            it->to = spec->target;
            it->out_nbytes = it->nbytes / fb * tb;
        }
        if (it->nbytes > UINT64_MAX - sum) {
            ds_fail(err, DS_ERR_FORMAT, "the files hold more than 2^64 bytes");
            goto fail;
        }
        sum += it->nbytes;
    }
    if (spec->split == PLAN_PER_FILE)
        for (size_t i = 0; i < n; i++)
            if (add_buffer(out, &cap_buffers, 0, i, err))
                goto fail;
    if (spec->split == PLAN_BUCKETS) {
        open_bucket = malloc(spec->readers * sizeof *open_bucket);
        if (!open_bucket) {
            ds_fail(err, DS_ERR_NOMEM, "out of memory");
            goto fail;
        }
        for (unsigned r = 0; r < spec->readers; r++)
            open_bucket[r] = SIZE_MAX;
    }
    uint64_t done = 0;
    for (size_t k = 0; k < kept; k++) {
        plan_item *it = &out->items[k];
        size_t b;
        if (spec->converted_only && it->to == it->from)
            continue;
        if (spec->split == PLAN_PER_FILE) {
            b = it->file;
        } else if (spec->split == PLAN_PER_TENSOR) {
            if (add_buffer(out, &cap_buffers, 0, it->file, err))
                goto fail;
            b = out->n_buffers - 1;
        } else {
            /* the reader whose share holds this tensor's middle byte: floor((done + nbytes/2) * readers /
             * sum), in exact integer arithmetic so that every rank computes the same */
            unsigned reader = 0;
            if (sum) {
                unsigned __int128 mid = (unsigned __int128)done * 2 + it->nbytes;
                unsigned __int128 r = mid * spec->readers / ((unsigned __int128)sum * 2);
                reader = r >= spec->readers ? spec->readers - 1 : (unsigned)r;
            }
            done += it->nbytes;
            b = open_bucket[reader];
            if (b == SIZE_MAX || (spec->bucket_bytes && out->buffers[b].nbytes &&
                                  (out->buffers[b].nbytes > UINT64_MAX - it->out_nbytes ||
                                   out->buffers[b].nbytes + it->out_nbytes > spec->bucket_bytes))) {
                if (add_buffer(out, &cap_buffers, reader, SIZE_MAX, err))
                    goto fail;
                b = open_bucket[reader] = out->n_buffers - 1;
            }
        }
        if (place(out, it, b, align)) {
            ds_fail(err, DS_ERR_FORMAT, "tensor '%.200s': the buffer's size overflows 64 bits",
                    hs[it->file].tensors[it->tensor].name);
            err->input = (int)it->file;
            goto fail;
        }
    }
    free(all);
    free(open_bucket);
    return 0;
fail:
    free(all);
    free(open_bucket);
    plan_layout_free(out);
    return -1;
}

void plan_layout_free(plan_layout *l) {
    free(l->buffers);
    free(l->items);
    memset(l, 0, sizeof *l);
}

int plan_run_task(void *ctx, size_t i, ds_error *err) {
    load_plan *plan = ctx;
    plan_task *t = &plan->tasks[i];
    int rc = 0;
    switch (t->kind) {
    case PLAN_POPULATE: rc = io_populate((void *)t->src, t->n, err); break;
    case PLAN_READ: rc = io_pread(plan->files[t->file].f.fd, t->dst, t->n, t->off, err); break;
    case PLAN_CONVERT: {
        size_t in_bytes = t->n * (st_dtype_bits(t->from) / 8);
        /* the output is fresh memory: one call faults this task's part of it in, on this thread,
         * rather than one fault per 4 KiB page as the conversion first writes there */
        io_prefault(t->dst, t->n * (st_dtype_bits(t->to) / 8));
        rc = io_populate((void *)t->src, in_bytes, err);
        if (!rc) {
            cv_run(t->from, t->to, t->src, t->dst, t->n);
            /* only this task reads these source bytes: the resident peak stays near the output */
            io_discard((void *)t->src, in_bytes);
        }
        break;
    }
    }
    if (rc)
        err->input = t->file;
    return rc;
}

static int add_task(load_plan *plan, plan_task t, ds_error *err) {
    if (plan->n_tasks == plan->cap_tasks) {
        size_t cap = plan->cap_tasks ? plan->cap_tasks * 2 : 256;
        plan_task *p = realloc(plan->tasks, cap * sizeof *p);
        if (!p)
            return ds_fail(err, DS_ERR_NOMEM, "out of memory while planning the load");
        plan->tasks = p;
        plan->cap_tasks = cap;
    }
    plan->tasks[plan->n_tasks++] = t;
    return 0;
}

int plan_add_byte_tasks(load_plan *plan, int kind, int file, const char *src, char *dst, uint64_t off, size_t len,
                        size_t chunk, ds_error *err) {
    for (size_t done = 0; done < len; done += chunk) {
        plan_task t = {kind,
                       file,
                       src ? src + done : NULL,
                       dst ? dst + done : NULL,
                       len - done < chunk ? len - done : chunk,
                       off + done,
                       ST_U8,
                       ST_U8};
        if (add_task(plan, t, err))
            return -1;
    }
    return 0;
}

/* Appends the tasks that convert file i's converted tensors to target, chunk by chunk, reading
 * from data (the first byte of its data section: the mapping, or the copy read in). */
static int add_convert_tasks(load_plan *plan, size_t i, const char *data, st_dtype target, ds_error *err) {
    const plan_file *lf = &plan->files[i];
    for (size_t k = 0; k < lf->h.n_tensors; k++) {
        const st_tensor *t = &lf->h.tensors[k];
        if (lf->conv_off[k] == UINT64_MAX)
            continue;
        size_t in_size = st_dtype_bits(t->dtype) / 8, out_size = st_dtype_bits(target) / 8;
        size_t numel = (size_t)((t->end - t->begin) / in_size);
        for (size_t e = 0; e < numel; e += PLAN_CONVERT_CHUNK) {
            plan_task task = {PLAN_CONVERT,
                              (int)i,
                              data + t->begin + e * in_size,
                              lf->conv + lf->conv_off[k] + e * out_size,
                              numel - e < PLAN_CONVERT_CHUNK ? numel - e : PLAN_CONVERT_CHUNK,
                              0,
                              t->dtype,
                              target};
            if (add_task(plan, task, err))
                return -1;
        }
    }
    return 0;
}

void plan_free(load_plan *plan) {
    for (size_t i = 0; i < plan->n_files; i++) {
        plan_file *lf = &plan->files[i];
        if (lf->opened) {
            io_close(&lf->f);
            st_free(&lf->h);
        }
        io_release(lf->map, lf->map_len);
        io_release(lf->copy, lf->copy_len);
        io_release(lf->conv, lf->conv_len);
        free(lf->conv_off);
    }
    free(plan->files);
    free(plan->tasks);
    memset(plan, 0, sizeof *plan);
}

/* Leases lf's mapping (lease.h) for the bytes its tensors will view: all of them, or with
 * conversions the tensors left unconverted. Returns 0, or -1 when no lease could be had. */
static int protect_mapping(plan_file *lf) {
    const st_header *h = &lf->h;
    if (!lf->conv_off)
        return ml_protect(lf->map, lf->map_len, lf->f.fd, NULL, NULL, 0);
    uint64_t *offs = malloc((h->n_tensors ? h->n_tensors : 1) * 2 * sizeof *offs);
    if (!offs)
        return -1;
    uint64_t *lens = offs + (h->n_tensors ? h->n_tensors : 1);
    size_t n = 0;
    for (size_t k = 0; k < h->n_tensors; k++) {
        const st_tensor *t = &h->tensors[k];
        if (lf->conv_off[k] == UINT64_MAX && t->end > t->begin) {
            offs[n] = h->data_start + t->begin;
            lens[n++] = t->end - t->begin;
        }
    }
    int rc = ml_protect(lf->map, lf->map_len, lf->f.fd, offs, lens, n);
    free(offs);
    return rc;
}

/* Opens, validates and plans every file. convert: a mask of the dtypes to
 * convert to target (0: none). Runs without the GIL. On failure sets
 * err->input to the failing file. */
int plan_load(load_plan *plan, const char *const *paths, size_t n, int use_map, unsigned convert, st_dtype target,
              ds_error *err) {
    plan->files = calloc(n ? n : 1, sizeof *plan->files);
    if (!plan->files)
        return ds_fail(err, DS_ERR_NOMEM, "out of memory");
    plan->n_files = n;
    {
        /* headers first, in parallel; then the plan, file by file */
        io_file *files = calloc(n ? n : 1, sizeof *files);
        st_header *headers = calloc(n ? n : 1, sizeof *headers);
        int *opened = calloc(n ? n : 1, sizeof *opened);
        int rc = -1;
        if (files && headers && opened)
            rc = plan_open_headers(paths, n, files, headers, opened, io_cpu_count(), err);
        else
            ds_fail(err, DS_ERR_NOMEM, "out of memory");
        for (size_t k = 0; k < n && opened; k++)
            if (opened[k]) {
                plan->files[k].f = files[k];
                plan->files[k].h = headers[k];
                plan->files[k].opened = 1;
            }
        free(files);
        free(headers);
        free(opened);
        if (rc)
            return -1;
    }
    size_t i = 0;
    for (; i < n; i++) {
        plan_file *lf = &plan->files[i];
        st_header *h = &lf->h;
        for (size_t k = 0; k < h->n_tensors; k++) {
            const st_tensor *t = &h->tensors[k];
            if (t->dtype == ST_F4 && (t->ndim == 0 || t->shape[t->ndim - 1] % 2)) {
                ds_fail(err, DS_ERR_UNSUPPORTED,
                        "tensor '%.200s': dtype F4 needs an even last dimension to become torch's float4_e2m1fn_x2",
                        t->name);
                goto fail;
            }
        }
        const char *data;
        if (use_map) {
            lf->map_len = (size_t)lf->f.size;
            lf->map = io_map_file(lf->f.fd, lf->f.size, err);
            if (!lf->map)
                goto fail;
        }
        /* conversion targets */
        if (convert) {
            lf->conv_off = malloc((h->n_tensors ? h->n_tensors : 1) * sizeof *lf->conv_off);
            if (!lf->conv_off) {
                ds_fail(err, DS_ERR_NOMEM, "out of memory");
                goto fail;
            }
            /* the same layout as every other buffer a load fills (plan_layout_build) */
            plan_layout_spec spec = {PLAN_PER_FILE, 0, 1, convert, target, PLAN_ALIGN_HOST, 1, 0};
            plan_layout l;
            if (plan_layout_build(h, 1, &spec, &l, err))
                goto fail;
            for (size_t k = 0; k < h->n_tensors; k++)
                lf->conv_off[k] = l.items[k].buffer == SIZE_MAX ? UINT64_MAX : l.items[k].buffer_offset;
            uint64_t conv_bytes = l.buffers[0].nbytes;
            plan_layout_free(&l);
            if (conv_bytes > SIZE_MAX) {
                ds_fail(err, DS_ERR_NOMEM, "the converted tensors need %llu bytes", (unsigned long long)conv_bytes);
                goto fail;
            }
            size_t total = (size_t)conv_bytes;
            if (total) {
                lf->conv_len = total;
                lf->conv = io_alloc(total, err);
                if (!lf->conv)
                    goto fail;
            }
        }
        /* The tensors will be views of resident pages: with a lease, the pages they use are copied
         * before the file changes in place (lease.h). Without one, the file could change under the
         * tensors unseen, so they get a copy of their own, read as in read mode. */
        if (lf->map && protect_mapping(lf) != 0) {
            io_release(lf->map, lf->map_len);
            lf->map = NULL;
        }
        if (lf->map) {
            data = lf->map + h->data_start;
        } else {
            lf->copy_len = (size_t)h->data_len;
            lf->copy = io_alloc(lf->copy_len, err);
            if (!lf->copy)
                goto fail;
            data = lf->copy;
        }
        /* tasks: bytes first (populate or read), then conversions */
        if (lf->map) {
            if (!convert || !lf->conv) {
                if (plan_add_byte_tasks(plan, PLAN_POPULATE, (int)i, data, NULL, 0, (size_t)h->data_len,
                                        PLAN_POPULATE_CHUNK, err))
                    goto fail;
            } else {
                /* populate only what is not converted (conversion faults its own source in) */
                for (size_t k = 0; k < h->n_tensors; k++) {
                    const st_tensor *t = &h->tensors[k];
                    if (lf->conv_off[k] == UINT64_MAX &&
                        plan_add_byte_tasks(plan, PLAN_POPULATE, (int)i, data + t->begin, NULL, 0,
                                            (size_t)(t->end - t->begin), PLAN_POPULATE_CHUNK, err))
                        goto fail;
                }
            }
        } else {
            if (plan_add_byte_tasks(plan, PLAN_READ, (int)i, NULL, lf->copy, h->data_start, (size_t)h->data_len,
                                    PLAN_READ_CHUNK, err))
                goto fail;
        }
        /* a mapped file converts now (each task faults its own source in); a read one after its reads */
        if (convert && lf->conv && lf->map && add_convert_tasks(plan, i, data, target, err))
            goto fail;
    }
    return 0;
fail:
    err->input = (int)i;
    return -1;
}

/* In read mode the conversion must wait for the bytes: a second phase. */
int plan_read_conversions(load_plan *plan, st_dtype target, ds_error *err) {
    plan->n_tasks = 0;
    for (size_t i = 0; i < plan->n_files; i++) {
        plan_file *lf = &plan->files[i];
        if (!lf->conv || lf->map) /* a mapped file converted in the first phase */
            continue;
        if (add_convert_tasks(plan, i, lf->copy, target, err))
            return -1;
    }
    return 0;
}

int plan_ranges(load_plan *plan, const char *path, const uint64_t *offs, const uint64_t *lens, const uint64_t *dest,
                size_t n, uint64_t total, int *use_map, ds_error *err) {
    plan->files = calloc(1, sizeof *plan->files);
    if (!plan->files)
        return ds_fail(err, DS_ERR_NOMEM, "out of memory");
    plan->n_files = 1;
    plan_file *lf = plan->files;
    if (io_open(path, &lf->f, err))
        return -1;
    lf->opened = 1;
    for (size_t i = 0; i < n; i++)
        if (offs[i] > lf->f.size || lens[i] > lf->f.size - offs[i])
            return ds_fail(err, DS_ERR_FORMAT, "bytes [%llu, %llu) are past the end of the file (%llu bytes)",
                           (unsigned long long)offs[i], (unsigned long long)(offs[i] + lens[i]),
                           (unsigned long long)lf->f.size);
    if (*use_map) {
        lf->map_len = (size_t)lf->f.size;
        lf->map = lf->f.size ? io_map_file(lf->f.fd, lf->f.size, err) : NULL;
        if (lf->f.size && !lf->map)
            return -1;
        /* as a load's (protect_mapping): leased for the ranges, or read when no lease can be had */
        if (lf->map && ml_protect(lf->map, lf->map_len, lf->f.fd, offs, lens, n) != 0) {
            io_release(lf->map, lf->map_len);
            lf->map = NULL;
            *use_map = 0;
        }
        for (size_t i = 0; *use_map && i < n; i++)
            if (plan_add_byte_tasks(plan, PLAN_POPULATE, 0, lf->map + offs[i], NULL, 0, (size_t)lens[i],
                                    PLAN_POPULATE_CHUNK, err))
                return -1;
    }
    if (!*use_map) {
        lf->copy_len = (size_t)(total ? total : 1);
        lf->copy = io_alloc(lf->copy_len, err);
        if (!lf->copy)
            return -1;
        for (size_t i = 0; i < n; i++)
            if (plan_add_byte_tasks(plan, PLAN_READ, 0, NULL, lf->copy + dest[i], offs[i], (size_t)lens[i],
                                    PLAN_READ_CHUNK, err))
                return -1;
    }
    return 0;
}

void plan_close_files(load_plan *plan) {
    for (size_t i = 0; i < plan->n_files; i++)
        if (plan->files[i].opened)
            io_close(&plan->files[i].f);
}
