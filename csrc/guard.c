/* guard.c: SIGBUS guard for file mappings (contract in guard.h).
 *
 * A fixed table of slots, each (base, len, label, faults), read by the signal handler without
 * locks: a slot is published by storing its base last (release) and retired by clearing base
 * first, so the handler sees either a whole slot or none. Registration and retirement serialise
 * on a mutex among themselves. */
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

enum { MG_SLOTS = 1024 };

typedef struct {
    _Atomic(uintptr_t) base;
    size_t len;
    char *label;
    atomic_uint faults;
} mg_slot;

static mg_slot slots[MG_SLOTS];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static atomic_int installed;
static void (*notify_hook)(void);

int mg_register(void *base, size_t len, const char *label) {
    char *copy = strdup(label ? label : "");
    if (!copy)
        return -1;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MG_SLOTS; i++) {
        if (atomic_load(&slots[i].base) == 0 && slots[i].label == NULL) {
            slots[i].len = len;
            slots[i].label = copy;
            atomic_store(&slots[i].faults, 0);
            atomic_store_explicit(&slots[i].base, (uintptr_t)base, memory_order_release);
            pthread_mutex_unlock(&mu);
            return 0;
        }
    }
    pthread_mutex_unlock(&mu);
    free(copy);
    return -1;
}

void mg_unregister(void *base) {
    if (!base)
        return;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MG_SLOTS; i++) {
        if (atomic_load(&slots[i].base) == (uintptr_t)base) {
            atomic_store(&slots[i].base, 0);
            if (atomic_load(&slots[i].faults) == 0) { /* a faulted slot keeps its label for the report */
                free(slots[i].label);
                slots[i].label = NULL;
            }
            break;
        }
    }
    pthread_mutex_unlock(&mu);
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx) {
    (void)ctx;
    uintptr_t addr = (uintptr_t)info->si_addr;
    for (int i = 0; i < MG_SLOTS; i++) {
        uintptr_t base = atomic_load_explicit(&slots[i].base, memory_order_acquire);
        if (base && addr >= base && addr - base < slots[i].len) {
            long page = sysconf(_SC_PAGESIZE);
            uintptr_t at = addr & ~((uintptr_t)page - 1);
            if (mmap((void *)at, (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) ==
                MAP_FAILED)
                break; /* cannot repair: fall through to the default action */
            atomic_fetch_add(&slots[i].faults, 1);
            if (notify_hook)
                notify_hook();
            return; /* the faulting access runs again and reads zeros */
        }
    }
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
    for (int i = 0; i < MG_SLOTS && n < max; i++) {
        if (slots[i].label && atomic_exchange(&slots[i].faults, 0) > 0) {
            labels[n++] = strdup(slots[i].label);
            if (atomic_load(&slots[i].base) == 0) { /* retired while faulted: the report was its last use */
                free(slots[i].label);
                slots[i].label = NULL;
            }
        }
    }
    pthread_mutex_unlock(&mu);
    return n;
}
