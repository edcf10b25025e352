/* io.c: files, regions and worker threads (contract in io.h). */
#define _GNU_SOURCE
#include "io.h"

#include "guard.h"
#include "lease.h"

#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

int io_open(const char *path, io_file *f, ds_error *err) {
    struct stat st;
    f->fd = -1;
    f->size = 0;
    /* O_NONBLOCK: a FIFO (or a device) must not block the open before fstat can refuse it; the flag
     * changes nothing for the regular files we go on to read */
    int fd;
    do /* a signal during an open that waits (a lease being broken) is not a failure to report */
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return ds_fail_os(err, errno, "cannot open: %s", strerror(errno));
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return ds_fail_os(err, e, "cannot stat: %s", strerror(e));
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return ds_fail_os(err, EISDIR, "is a directory, not a model file");
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return ds_fail(err, DS_ERR_FORMAT, "is not a regular file");
    }
    f->fd = fd;
    f->size = (uint64_t)st.st_size;
    return 0;
}

void io_close(io_file *f) {
    if (f->fd >= 0)
        close(f->fd);
    f->fd = -1;
}

int io_pread(int fd, void *dst, size_t len, uint64_t off, ds_error *err) {
    char *p = dst;
    while (len) {
        ssize_t r = pread(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return ds_fail_os(err, errno, "read of %zu bytes at offset %llu failed: %s", len, (unsigned long long)off,
                              strerror(errno));
        }
        if (r == 0) {
            /* the end is not off itself: the file may have shrunk to well before this task's range */
            struct stat st;
            if (fstat(fd, &st) != 0)
                st.st_size = 0;
            return ds_fail(err, DS_ERR_FORMAT,
                           "the file now holds %llu bytes, fewer than the %zu bytes the header promised at offset "
                           "%llu: it was truncated while being read",
                           (unsigned long long)st.st_size, len, (unsigned long long)off);
        }
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

int io_pwrite(int fd, const void *src, size_t len, uint64_t off, ds_error *err) {
    const char *p = src;
    while (len) {
        ssize_t r = pwrite(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return ds_fail_os(err, errno, "write of %zu bytes at offset %llu failed: %s", len, (unsigned long long)off,
                              strerror(errno));
        }
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

size_t io_page_size(void) {
    static size_t page;
    if (!page)
        page = (size_t)sysconf(_SC_PAGESIZE);
    return page;
}

int io_cpu_count(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0)
            return n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

void *io_map_file(int fd, uint64_t size, ds_error *err) {
    if (size > SIZE_MAX) {
        ds_fail(err, DS_ERR_UNSUPPORTED, "file of %llu bytes does not fit the address space", (unsigned long long)size);
        return NULL;
    }
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
        ds_fail_os(err, errno, "cannot map %llu bytes: %s", (unsigned long long)size, strerror(errno));
        return NULL;
    }
    /* guarded against the file being truncated under it (guard.h), named by the fd's path */
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    path[n > 0 ? n : 0] = '\0';
    mg_register(p, (size_t)size, path);
    return p;
}

void *io_map_range(int fd, uint64_t off, uint64_t len, size_t *lead, ds_error *err) {
    uint64_t start = off & ~(uint64_t)(io_page_size() - 1);
    if (len > SIZE_MAX - (off - start) || off > INT64_MAX) {
        ds_fail(err, DS_ERR_UNSUPPORTED, "bytes [%llu, +%llu) do not fit the address space", (unsigned long long)off,
                (unsigned long long)len);
        return NULL;
    }
    size_t n = (size_t)(len + (off - start));
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, (off_t)start);
    if (p == MAP_FAILED) {
        ds_fail_os(err, errno, "cannot map %zu bytes at offset %llu: %s", n, (unsigned long long)start,
                   strerror(errno));
        return NULL;
    }
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t k = readlink(link, path, sizeof path - 1);
    path[k > 0 ? k : 0] = '\0';
    if (mg_register(p, n, path) != 0) {
        munmap(p, n);
        ds_fail(err, DS_ERR_UNSUPPORTED, "no slot left in the truncation guard for another mapping");
        return NULL;
    }
    *lead = (size_t)(off - start);
    return p;
}

void *io_alloc(size_t len, ds_error *err) {
    void *p = mmap(NULL, len ? len : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        ds_fail(err, DS_ERR_NOMEM, "cannot allocate %zu bytes", len);
        return NULL;
    }
    /* No MADV_HUGEPAGE: with the kernel's default defrag=madvise it makes every fault of the region
     * compact memory synchronously. Measured on the CI machine kind (fresh process, 1.5 GB output
     * of a BF16->F32 load, 5 runs each): median 2.1 s with the advice, 0.89 s without, and the
     * worst case with it was 3.0 s. See docs/design-notes.md. */
    return p;
}

void io_release(void *addr, size_t len) {
    ml_release(addr); /* a load's mapping may hold a lease (lease.h) */
    mg_unregister(addr);
    if (addr)
        munmap(addr, len ? len : 1);
}

int io_populate(void *addr, size_t len, ds_error *err) {
    size_t page = io_page_size();
    uintptr_t a = (uintptr_t)addr & ~(uintptr_t)(page - 1);
    size_t n = len + ((uintptr_t)addr - a);
    if (!len)
        return 0;
    for (;;) {
        if (madvise((void *)a, n, MADV_POPULATE_READ) == 0)
            break;
        if (errno == EINTR || errno == EAGAIN)
            continue;
        if (errno == EINVAL)
            break; /* a kernel before 5.14: the reads below fault the pages in */
        if (errno == EFAULT)
            return ds_fail(err, DS_ERR_FORMAT, "the file shrank while being read (a page past its end was asked for)");
        return ds_fail_os(err, errno, "cannot read pages in: %s", strerror(errno));
    }
    /* Then one read of every page, here on the worker: mapping a page is not the CPU's first touch
     * of it. Under a hypervisor that first touch of a page the disk filled can cost microseconds
     * (the host maps the guest page then); measured on the 2-core CI VM: 9 s for a cold 11.4 GB
     * text encoder, paid single-threaded by the user's first pass over the weights after the load
     * had returned. Here it runs in parallel, overlapped with the other workers' disk reads; on
     * pages already touched it costs a load per page (~50 ns). */
    volatile const unsigned char *p = (const unsigned char *)a;
    unsigned char sink = 0;
    for (size_t off = 0; off < n; off += page)
        sink ^= p[off];
    (void)sink;
    return 0;
}

void io_prefault(void *addr, size_t len) {
    size_t page = io_page_size();
    uintptr_t a = (uintptr_t)addr & ~(uintptr_t)(page - 1);
    if (len) /* advice only: where it fails (a kernel before 5.14) the writes fault the pages in */
        madvise((void *)a, len + ((uintptr_t)addr - a), MADV_POPULATE_WRITE);
}

void io_discard(void *addr, size_t len) {
    size_t page = io_page_size();
    uintptr_t a = ((uintptr_t)addr + page - 1) & ~(uintptr_t)(page - 1);
    uintptr_t e = ((uintptr_t)addr + len) & ~(uintptr_t)(page - 1);
    if (e > a)
        madvise((void *)a, e - a, MADV_DONTNEED); /* advice only: a failure costs memory, not data */
}

/* ---- io_run ------------------------------------------------------------ */

#define IO_MAX_THREADS 64

typedef struct {
    io_task_fn fn;
    void *ctx;
    size_t n_tasks;
    atomic_size_t next;
    atomic_int stop;
    pthread_mutex_t mu;
    pthread_cond_t done_cv;
    int running;
    int failed;
    ds_error *err;
} run_state;

static void run_tasks(run_state *rs) {
    ds_error local;
    for (;;) {
        if (atomic_load_explicit(&rs->stop, memory_order_relaxed))
            return;
        size_t i = atomic_fetch_add(&rs->next, 1);
        if (i >= rs->n_tasks)
            return;
        if (rs->fn(rs->ctx, i, &local) != 0) {
            pthread_mutex_lock(&rs->mu);
            if (!rs->failed) {
                rs->failed = 1;
                *rs->err = local;
            }
            pthread_mutex_unlock(&rs->mu);
            atomic_store(&rs->stop, 1);
            return;
        }
    }
}

static void *worker(void *arg) {
    run_state *rs = arg;
    run_tasks(rs);
    pthread_mutex_lock(&rs->mu);
    rs->running--;
    pthread_cond_signal(&rs->done_cv);
    pthread_mutex_unlock(&rs->mu);
    return NULL;
}

int io_run(size_t n_tasks, int n_threads, io_task_fn fn, void *ctx, io_poll_fn poll, void *poll_ctx, ds_error *err) {
    run_state rs;
    memset(&rs, 0, sizeof rs);
    rs.fn = fn;
    rs.ctx = ctx;
    rs.n_tasks = n_tasks;
    atomic_init(&rs.next, 0);
    atomic_init(&rs.stop, 0);
    rs.err = err;
    if (n_tasks == 0)
        return 0;
    if ((size_t)n_threads > n_tasks)
        n_threads = (int)n_tasks;
    if (n_threads <= 1) {
        /* inline: poll between tasks */
        for (size_t i = 0; i < n_tasks; i++) {
            if (poll && poll(poll_ctx))
                return ds_fail(err, DS_ERR_INTERRUPTED, "interrupted");
            if (fn(ctx, i, err) != 0)
                return -1;
        }
        return 0;
    }
    pthread_mutex_init(&rs.mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&rs.done_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_t threads[IO_MAX_THREADS];
    int started = 0;
    if (n_threads > IO_MAX_THREADS)
        n_threads = IO_MAX_THREADS;
    for (int t = 0; t < n_threads; t++) {
        pthread_mutex_lock(&rs.mu);
        rs.running++;
        pthread_mutex_unlock(&rs.mu);
        if (pthread_create(&threads[started], NULL, worker, &rs) != 0) {
            pthread_mutex_lock(&rs.mu);
            rs.running--;
            pthread_mutex_unlock(&rs.mu);
            break;
        }
        started++;
    }
    int interrupted = 0;
    pthread_mutex_lock(&rs.mu);
    if (rs.running == 0) {
        /* no thread could start: do the work here */
        pthread_mutex_unlock(&rs.mu);
        run_tasks(&rs);
        pthread_mutex_lock(&rs.mu);
    }
    while (rs.running > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += 20 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&rs.done_cv, &rs.mu, &ts);
        if (rs.running > 0 && poll && !interrupted) {
            pthread_mutex_unlock(&rs.mu);
            if (poll(poll_ctx)) {
                interrupted = 1;
                atomic_store(&rs.stop, 1);
            }
            pthread_mutex_lock(&rs.mu);
        }
    }
    int failed = rs.failed;
    pthread_mutex_unlock(&rs.mu);
    for (int t = 0; t < started; t++)
        pthread_join(threads[t], NULL);
    pthread_cond_destroy(&rs.done_cv);
    pthread_mutex_destroy(&rs.mu);
    if (interrupted)
        return ds_fail(err, DS_ERR_INTERRUPTED, "interrupted");
    return failed ? -1 : 0;
}
