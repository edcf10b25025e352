/* guard.c: SIGBUS guard for file mappings (contract in guard.h).
 *
 * A list of chunks of slots, each slot (base, len, label, faults), read by the signal handler
 * without locks: a slot is published by storing its base last (release) and retired by clearing
 * base first, so the handler sees either a whole slot or none. A chunk is appended (published by
 * storing the pointer to it last) when every slot is taken, and never freed, so any number of
 * mappings is guarded and the handler never follows a dangling pointer. Registration and
 * retirement serialise on a mutex among themselves. */
#define _GNU_SOURCE
#include "guard.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

enum { MG_CHUNK = 1024 };

typedef struct {
    _Atomic(uintptr_t) base;
    size_t len;
    char *label;
    atomic_uint faults;
} mg_slot;

typedef struct mg_chunk {
    mg_slot slots[MG_CHUNK];
    _Atomic(struct mg_chunk *) next;
} mg_chunk;

static mg_chunk first;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static atomic_int installed;
static void (*notify_hook)(void);

/* The chunk after c, or NULL (acquire: its slots are zeroed before it is published). */
static mg_chunk *next_chunk(mg_chunk *c) { return atomic_load_explicit(&c->next, memory_order_acquire); }

int mg_register(void *base, size_t len, const char *label) {
    char *copy = strdup(label ? label : "");
    if (!copy)
        return -1;
    pthread_mutex_lock(&mu);
    mg_chunk *c = &first, *last = &first;
    for (; c; last = c, c = next_chunk(c)) {
        for (int i = 0; i < MG_CHUNK; i++) {
            mg_slot *sl = &c->slots[i];
            if (atomic_load(&sl->base) == 0 && sl->label == NULL) {
                sl->len = len;
                sl->label = copy;
                atomic_store(&sl->faults, 0);
                atomic_store_explicit(&sl->base, (uintptr_t)base, memory_order_release);
                pthread_mutex_unlock(&mu);
                return 0;
            }
        }
    }
    mg_chunk *fresh = calloc(1, sizeof *fresh);
    if (!fresh) {
        pthread_mutex_unlock(&mu);
        free(copy);
        return -1;
    }
    fresh->slots[0].len = len;
    fresh->slots[0].label = copy;
    atomic_store_explicit(&fresh->slots[0].base, (uintptr_t)base, memory_order_relaxed);
    atomic_store_explicit(&last->next, fresh, memory_order_release);
    pthread_mutex_unlock(&mu);
    return 0;
}

void mg_unregister(void *base) {
    if (!base)
        return;
    pthread_mutex_lock(&mu);
    for (mg_chunk *c = &first; c; c = next_chunk(c)) {
        for (int i = 0; i < MG_CHUNK; i++) {
            mg_slot *sl = &c->slots[i];
            if (atomic_load(&sl->base) == (uintptr_t)base) {
                atomic_store(&sl->base, 0);
                if (atomic_load(&sl->faults) == 0) { /* a faulted slot keeps its label for the report */
                    free(sl->label);
                    sl->label = NULL;
                }
                goto out;
            }
        }
    }
out:
    pthread_mutex_unlock(&mu);
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx) {
    (void)ctx;
    uintptr_t addr = (uintptr_t)info->si_addr;
    for (mg_chunk *c = &first; c; c = next_chunk(c)) {
        for (int i = 0; i < MG_CHUNK; i++) {
            mg_slot *sl = &c->slots[i];
            uintptr_t base = atomic_load_explicit(&sl->base, memory_order_acquire);
            if (base && addr >= base && addr - base < sl->len) {
                long page = sysconf(_SC_PAGESIZE);
                uintptr_t at = addr & ~((uintptr_t)page - 1);
                if (mmap((void *)at, (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
                         0) == MAP_FAILED)
                    goto unguarded; /* cannot repair: the default action */
                atomic_fetch_add(&sl->faults, 1);
                if (notify_hook)
                    notify_hook();
                return; /* the faulting access runs again and reads zeros */
            }
        }
    }
unguarded:;
    /* not ours: the default action, as if no handler were installed */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
}

int mg_install(void (*notify)(void)) {
    notify_hook = notify;
    if (atomic_exchange(&installed, 1))
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, NULL) != 0) {
        atomic_store(&installed, 0);
        return -1;
    }
    return 0;
}

size_t mg_take_faults(char **labels, size_t max) {
    size_t n = 0;
    pthread_mutex_lock(&mu);
    for (mg_chunk *c = &first; c && n < max; c = next_chunk(c)) {
        for (int i = 0; i < MG_CHUNK && n < max; i++) {
            mg_slot *sl = &c->slots[i];
            if (sl->label && atomic_exchange(&sl->faults, 0) > 0) {
                labels[n++] = strdup(sl->label);
                if (atomic_load(&sl->base) == 0) { /* retired while faulted: the report was its last use */
                    free(sl->label);
                    sl->label = NULL;
                }
            }
        }
    }
    pthread_mutex_unlock(&mu);
    return n;
}
