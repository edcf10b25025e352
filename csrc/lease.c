/* lease.c: read leases that keep mapped tensors' bytes when their file changes (contract in lease.h).
 *
 * Each protected mapping holds a duplicate descriptor of its file with a read lease on it, the
 * lease's break signal set to one real-time signal and its owner set to the process. When a
 * writer opens or truncates the file, the kernel holds the writer and sends that signal. The
 * handler only writes the descriptor number into a pipe (async-signal-safe). One watcher thread,
 * with every signal blocked, reads the pipe and, under the registry's mutex, copies each mapping
 * of that descriptor into fresh anonymous memory and moves the copy over the mapping (mremap with
 * MREMAP_FIXED: readers on other threads see the old pages or the copy, never a hole), then closes
 * the descriptor, which gives the lease back and lets the writer go on.
 *
 * Memory: the registry is an array grown by doubling, one entry (base, len, fd) per protected
 * mapping. A copy needs the mapping's size in fresh memory while it runs. If the watcher cannot
 * copy (no memory), it still gives the lease back and the SIGBUS guard (guard.h) is the last line.
 * If it does not answer within /proc/sys/fs/lease-break-time (45 s by default), the kernel breaks
 * the lease itself. */
#define _GNU_SOURCE
#include "lease.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

typedef struct {
    void *base;
    size_t len;
    int fd;         /* the leased duplicate */
    size_t *ranges; /* n_ranges (offset, length) pairs that tensors use; NULL: all of it */
    size_t n_ranges;
} ml_entry;

static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static atomic_int enabled;
static int break_signal;
static int pipe_rd = -1, pipe_wr = -1;
static size_t limit; /* most leases held at once (descriptors kept open) */
static ml_entry *entries;
static size_t n_entries, cap_entries;

static void on_break(int sig, siginfo_t *info, void *ctx) {
    (void)sig, (void)ctx;
    int saved = errno, fd = info->si_fd;
    /* a full pipe drops the note: the kernel then breaks the lease after its timeout */
    ssize_t r = write(pipe_wr, &fd, sizeof fd);
    (void)r;
    errno = saved;
}

/* Copies the used ranges of e's mapping into anonymous memory and moves the copy over the mapping
 * (pages outside the ranges become zero pages that take no memory). Returns 0 or -1. */
static int copy_in_place(const ml_entry *e) {
    void *anon = mmap(NULL, e->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (anon == MAP_FAILED)
        return -1;
    if (!e->ranges)
        memcpy(anon, e->base, e->len);
    for (size_t i = 0; i < e->n_ranges; i++)
        memcpy((char *)anon + e->ranges[2 * i], (const char *)e->base + e->ranges[2 * i], e->ranges[2 * i + 1]);
    void *base = e->base;
    size_t len = e->len;
    if (mremap(anon, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, base) == MAP_FAILED) {
        munmap(anon, len);
        return -1;
    }
    return 0;
}

static void *watch(void *arg) {
    (void)arg;
    /* Faults must reach their handlers: Linux kills the process for a fault signal that is
     * blocked. A copy that faults (a lease the kernel broke after its timeout) then reads the
     * guard's zeros (guard.h). */
    sigset_t faults;
    sigemptyset(&faults);
    sigaddset(&faults, SIGBUS);
    sigaddset(&faults, SIGSEGV);
    sigaddset(&faults, SIGFPE);
    sigaddset(&faults, SIGILL);
    pthread_sigmask(SIG_UNBLOCK, &faults, NULL);
    for (;;) {
        int fd;
        ssize_t r = read(pipe_rd, &fd, sizeof fd);
        if (r < 0 && errno == EINTR)
            continue;
        if (r != (ssize_t)sizeof fd)
            return NULL;
        pthread_mutex_lock(&mu);
        for (size_t i = 0; i < n_entries;) {
            if (entries[i].fd != fd) {
                i++;
                continue;
            }
            /* on failure the SIGBUS guard is what is left; either way the lease goes back, and the
             * writer goes on */
            copy_in_place(&entries[i]);
            close(entries[i].fd);
            free(entries[i].ranges);
            entries[i] = entries[--n_entries];
        }
        pthread_mutex_unlock(&mu);
    }
}

static void setup(void) {
    struct rlimit rl;
    limit = 4096;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur / 4 < limit)
        limit = (size_t)(rl.rlim_cur / 4);
    break_signal = SIGRTMIN + 5;
    if (break_signal > SIGRTMAX)
        return;
    struct sigaction old;
    if (sigaction(break_signal, NULL, &old) != 0 || (old.sa_flags & SA_SIGINFO) || old.sa_handler != SIG_DFL)
        return; /* the signal belongs to someone else: no leases */
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0)
        return;
    if (fcntl(p[1], F_SETFL, O_NONBLOCK) != 0) {
        close(p[0]);
        close(p[1]);
        return;
    }
    pipe_rd = p[0];
    pipe_wr = p[1];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_break;
    sa.sa_flags = SA_SIGINFO | SA_RESTART; /* the interrupted call of a thread that is the writer resumes */
    sigemptyset(&sa.sa_mask);
    if (sigaction(break_signal, &sa, NULL) != 0)
        return;
    sigset_t all, prev;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &prev); /* the watcher inherits a mask that blocks the rest */
    pthread_t t;
    int started = pthread_create(&t, NULL, watch, NULL) == 0;
    pthread_sigmask(SIG_SETMASK, &prev, NULL);
    if (!started)
        return;
    pthread_detach(t);
    atomic_store(&enabled, 1);
}

int ml_protect(void *base, size_t len, int fd, const uint64_t *offs, const uint64_t *lens, size_t n_ranges) {
    pthread_once(&once, setup);
    if (!atomic_load(&enabled) || !base || !len)
        return -1;
    size_t *ranges = NULL;
    if (offs) {
        ranges = malloc((n_ranges ? n_ranges : 1) * 2 * sizeof *ranges);
        if (!ranges)
            return -1;
        for (size_t i = 0; i < n_ranges; i++) {
            if (offs[i] > len || lens[i] > len - offs[i]) {
                free(ranges);
                return -1;
            }
            ranges[2 * i] = (size_t)offs[i];
            ranges[2 * i + 1] = (size_t)lens[i];
        }
    }
    int rc = -1;
    pthread_mutex_lock(&mu);
    if (n_entries >= limit)
        goto out;
    if (n_entries == cap_entries) {
        size_t cap = cap_entries ? cap_entries * 2 : 64;
        ml_entry *p = realloc(entries, cap * sizeof *p);
        if (!p)
            goto out;
        entries = p;
        cap_entries = cap;
    }
    int dup = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (dup < 0)
        goto out;
    /* F_SETLEASE makes the calling thread the owner on older kernels: F_SETOWN after it sends the
     * break to the process, whose any thread may take it (the calling thread may be gone by then) */
    if (fcntl(dup, F_SETSIG, break_signal) != 0 || fcntl(dup, F_SETLEASE, F_RDLCK) != 0 ||
        fcntl(dup, F_SETOWN, getpid()) != 0) {
        close(dup);
        goto out;
    }
    entries[n_entries++] = (ml_entry){base, len, dup, ranges, offs ? n_ranges : 0};
    ranges = NULL;
    rc = 0;
out:
    pthread_mutex_unlock(&mu);
    free(ranges);
    return rc;
}

void ml_release(void *base) {
    if (!base || !atomic_load(&enabled))
        return;
    pthread_mutex_lock(&mu);
    for (size_t i = 0; i < n_entries; i++) {
        if (entries[i].base == base) {
            close(entries[i].fd);
            free(entries[i].ranges);
            entries[i] = entries[--n_entries];
            break;
        }
    }
    pthread_mutex_unlock(&mu);
}
