/* io.h: files, memory regions and the worker threads that move bytes.
 *
 * Nothing here knows a file format. Regions are page-aligned mappings: either
 * a private, writable mapping of a whole file (tensors are views into the page
 * cache, copied only when written to) or anonymous memory for results that
 * differ from the file's bytes (dtype conversion). io_run spreads tasks over
 * short-lived threads while the caller, who holds no GIL, waits and polls for
 * cancellation (Ctrl-C) between timeouts. */
#ifndef DS_IO_H
#define DS_IO_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef struct {
    int fd;
    uint64_t size;
} io_file;

/* Opens a regular file for reading. Returns 0, or -1 with err (ENOENT,
 * EISDIR, EACCES, ...) filled. */
int io_open(const char *path, io_file *f, ds_error *err);
void io_close(io_file *f);

/* Reads exactly len bytes at off, retrying short reads and EINTR. A file that
 * ends early is reported as having shrunk. Returns 0 or -1 with err. */
int io_pread(int fd, void *dst, size_t len, uint64_t off, ds_error *err);

/* Writes exactly len bytes at off, retrying short writes and EINTR. Returns 0 or -1 with err
 * (ENOSPC, EIO, ...). */
int io_pwrite(int fd, const void *src, size_t len, uint64_t off, ds_error *err);

/* Maps a whole file privately (copy-on-write), guarded against SIGBUS (guard.h). Returns the base
 * or NULL with err. */
void *io_map_file(int fd, uint64_t size, ds_error *err);

/* Maps the bytes [off, off+len) of a file privately (copy-on-write), from the page that holds off,
 * guarded as io_map_file's mapping. *lead is set to off's distance from the returned base, so the
 * mapping covers *lead + len bytes (release it with that length). len must be > 0. Returns the
 * base, or NULL with err: DS_ERR_UNSUPPORTED when the guard has no slot left (nothing is mapped
 * then: the caller reads the bytes instead of leaving a mapping unguarded). */
void *io_map_range(int fd, uint64_t off, uint64_t len, size_t *lead, ds_error *err);

/* Anonymous, zero-filled, page-aligned memory (no huge-page advice: see io.c).
 * Returns NULL with err when out of memory. */
void *io_alloc(size_t len, ds_error *err);

/* Unmaps a region from io_map_file or io_alloc (len as given there), giving back its lease if it
 * holds one (lease.h). */
void io_release(void *addr, size_t len);

/* Faults the pages of [addr, addr+len) of a file mapping in, reading them from
 * disk when they are not cached, without copying them, then reads one byte of each
 * (the CPU's first touch, which under a hypervisor has a cost of its own: see io.c).
 * Returns 0, or -1 with err when the file no longer covers the range (truncated under us). */
int io_populate(void *addr, size_t len, ds_error *err);

/* Faults the pages of [addr, addr+len) of anonymous memory in, writable, in one call
 * (MADV_POPULATE_WRITE) instead of one page fault per page at the first write: the conversion
 * workers call it on the part of the output each converts, so the faults are cheaper and spread
 * over the threads. Only advice: nothing changes in the bytes, and a failure is ignored. */
void io_prefault(void *addr, size_t len);

/* Gives back the whole pages inside [addr, addr+len) that nothing will read again (the source of
 * a finished conversion): they leave the process's resident set (a file mapping's pages stay in
 * the page cache). A later read would see the file again, or zeros for anonymous memory. */
void io_discard(void *addr, size_t len);

/* Page size of this machine. */
size_t io_page_size(void);

/* CPUs this process may run on. */
int io_cpu_count(void);

typedef int (*io_task_fn)(void *ctx, size_t task, ds_error *err);
/* Called by the waiting thread every few milliseconds; returns nonzero to
 * cancel the remaining tasks. */
typedef int (*io_poll_fn)(void *poll_ctx);

/* Runs fn(ctx, i, err) for every i in [0, n_tasks) on up to n_threads threads.
 * Tasks are taken in order from a shared counter. Stops early on the first
 * failing task (its err is reported) or when poll cancels (then err's status
 * is DS_ERR_INTERRUPTED). Returns 0 or -1. */
int io_run(size_t n_tasks, int n_threads, io_task_fn fn, void *ctx, io_poll_fn poll, void *poll_ctx, ds_error *err);

#endif
