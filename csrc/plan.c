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

static int merged_cmp(const void *x, const void *y) {
    const merged_entry *a = x, *b = y;
    size_t n = a->t->name_len < b->t->name_len ? a->t->name_len : b->t->name_len;
    int r = memcmp(a->t->name, b->t->name, n);
    if (r)
        return r;
    if (a->t->name_len != b->t->name_len)
        return a->t->name_len < b->t->name_len ? -1 : 1;
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
            size_t total = 0;
            for (size_t k = 0; k < h->n_tensors; k++) {
                const st_tensor *t = &h->tensors[k];
                lf->conv_off[k] = UINT64_MAX;
                if (t->end == t->begin || t->dtype == target || !(convert & (1u << t->dtype)))
                    continue;
                size_t numel = (size_t)((t->end - t->begin) / (st_dtype_bits(t->dtype) / 8));
                lf->conv_off[k] = total;
                total += (numel * (st_dtype_bits(target) / 8) + 63) & ~(size_t)63;
            }
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
