/* readinto.c: parallel reads into caller-owned memory (contract in readinto.h). Items are cut
 * into tasks of at most RI_TASK bytes; a plain copy preads straight into the destination, a
 * conversion preads into a task-sized buffer and converts from there while it is in cache. */
#include "readinto.h"

#include <stdio.h>
#include <stdlib.h>

#include "convert.h"
#include "io.h"

#define RI_TASK ((uint64_t)8 << 20)

typedef struct {
    size_t item;
    uint64_t off; /* bytes into the item's source */
    uint64_t len;
} ri_task;

typedef struct {
    const ri_item *items;
    ri_task *tasks;
} ri_job;

static int ri_do(void *ctx, size_t i, ds_error *err) {
    ri_job *job = ctx;
    const ri_task *t = &job->tasks[i];
    const ri_item *it = &job->items[t->item];
    int rc;
    if (it->src == it->dst) {
        rc = io_pread(it->fd, (char *)it->out + t->off, t->len, it->offset + t->off, err);
    } else {
        void *tmp = malloc(t->len ? t->len : 1);
        if (!tmp)
            return ds_fail(err, DS_ERR_NOMEM, "tensor '%s': cannot allocate %llu bytes to convert", it->name,
                           (unsigned long long)t->len);
        rc = io_pread(it->fd, tmp, t->len, it->offset + t->off, err);
        if (!rc) {
            size_t in_size = st_dtype_bits(it->src) / 8, out_size = st_dtype_bits(it->dst) / 8;
            cv_run(it->src, it->dst, tmp, (char *)it->out + t->off / in_size * out_size, t->len / in_size);
        }
        free(tmp);
    }
    if (rc) {
        err->input = it->file;
        char saved[sizeof err->msg];
        snprintf(saved, sizeof saved, "%s", err->msg);
        snprintf(err->msg, sizeof err->msg, "tensor '%.200s': %.800s", it->name, saved);
    }
    return rc;
}

int ri_run(const ri_item *items, size_t n, int threads, ds_error *err) {
    size_t n_tasks = 0;
    for (size_t i = 0; i < n; i++)
        n_tasks += items[i].nbytes ? (size_t)((items[i].nbytes + RI_TASK - 1) / RI_TASK) : 0;
    ri_task *tasks = malloc((n_tasks ? n_tasks : 1) * sizeof *tasks);
    if (!tasks)
        return ds_fail(err, DS_ERR_NOMEM, "cannot plan %zu reads", n_tasks);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        /* RI_TASK is a multiple of every element size, so conversion tasks end on elements */
        for (uint64_t off = 0; off < items[i].nbytes; off += RI_TASK) {
            tasks[k].item = i;
            tasks[k].off = off;
            tasks[k].len = items[i].nbytes - off < RI_TASK ? items[i].nbytes - off : RI_TASK;
            k++;
        }
    }
    ri_job job = {items, tasks};
    int rc = io_run(n_tasks, threads, ri_do, &job, NULL, NULL, err);
    free(tasks);
    return rc;
}
