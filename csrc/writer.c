/* writer.c: a safetensors file written to a temporary name, flushed, then renamed into place
 * (contract in writer.h). */
#define _GNU_SOURCE /* O_CLOEXEC, ftruncate, sync_file_range under -std=c11 */
#include "writer.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io.h"
#include "plan.h"

typedef struct {
    int fd;
    const char *src;
    size_t n;
    uint64_t off;
} write_task;

static int run_write(void *ctx, size_t i, ds_error *err) {
    write_task *t = &((write_task *)ctx)[i];
    int rc = io_pwrite(t->fd, t->src, t->n, t->off, err);
    /* start writing this chunk to disk now (without waiting for it), so the disk works while the
     * next chunks are copied and the final fsync has little left to wait for; fsync still decides */
    if (!rc)
        sync_file_range(t->fd, (off_t)t->off, (off_t)t->n, SYNC_FILE_RANGE_WRITE);
    return rc;
}

/* The pieces cut into tasks of at most PLAN_READ_CHUNK bytes at their offsets in the file, which
 * ends at *end. Returns the tasks (caller frees), or NULL with err. */
static write_task *plan_writes(const wr_piece *pieces, size_t n, uint64_t start, size_t *n_tasks, uint64_t *end,
                               ds_error *err) {
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        count += (size_t)((pieces[i].nbytes + PLAN_READ_CHUNK - 1) / PLAN_READ_CHUNK);
    write_task *tasks = malloc((count ? count : 1) * sizeof *tasks);
    if (!tasks) {
        ds_fail(err, DS_ERR_NOMEM, "out of memory while planning %zu writes", count);
        return NULL;
    }
    uint64_t off = start;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t nbytes = pieces[i].nbytes;
        for (uint64_t done = 0; done < nbytes; done += PLAN_READ_CHUNK) { /* 8 MiB pieces */
            size_t len = nbytes - done < PLAN_READ_CHUNK ? (size_t)(nbytes - done) : PLAN_READ_CHUNK;
            tasks[k++] = (write_task){-1, pieces[i].src + done, len, off + done};
        }
        off += nbytes;
    }
    *n_tasks = k;
    *end = off;
    return tasks;
}

int wr_write_file(const char *path, const void *header, size_t header_len, const wr_piece *pieces, size_t n,
                  int threads, ds_error *err) {
    size_t n_tasks = 0;
    uint64_t off = 0;
    write_task *tasks = plan_writes(pieces, n, 8 + (uint64_t)header_len, &n_tasks, &off, err);
    if (!tasks)
        return -1;
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 32);
    if (!tmp) {
        free(tasks);
        return ds_fail(err, DS_ERR_NOMEM, "out of memory");
    }
    snprintf(tmp, plen + 32, "%s.tmp-%ld", path, (long)getpid());
    int rc = 0;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        rc = ds_fail_os(err, errno, "cannot create %s: %s", tmp, strerror(errno));
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)((uint64_t)header_len >> (8 * i));
    if (!rc && ftruncate(fd, (off_t)off) != 0)
        rc = ds_fail_os(err, errno, "cannot size the file to %llu bytes: %s", (unsigned long long)off, strerror(errno));
    if (!rc)
        rc = io_pwrite(fd, len8, 8, 0, err);
    if (!rc)
        rc = io_pwrite(fd, header, header_len, 8, err);
    for (size_t i = 0; i < n_tasks; i++)
        tasks[i].fd = fd;
    if (!rc)
        rc = io_run(n_tasks, threads, run_write, tasks, NULL, NULL, err);
    if (!rc && fsync(fd) != 0)
        rc = ds_fail_os(err, errno, "fsync failed: %s", strerror(errno));
    if (fd >= 0 && close(fd) != 0 && !rc)
        rc = ds_fail_os(err, errno, "close failed: %s", strerror(errno));
    if (!rc && rename(tmp, path) != 0)
        rc = ds_fail_os(err, errno, "cannot rename %s into place: %s", tmp, strerror(errno));
    if (rc)
        unlink(tmp);
    free(tmp);
    free(tasks);
    return rc ? -1 : 0;
}
