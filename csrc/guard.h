/* guard.h: file mappings that survive their file being truncated.
 *
 * A tensor that is a view of a private file mapping reads the file's page-cache pages until it is
 * written to. When the file is truncated under it, the kernel drops those pages and the next touch
 * raises SIGBUS, which kills the process. Registered mappings are guarded: a SIGBUS inside one maps
 * a page of zeros over the faulting page (so the touching instruction completes), counts the fault
 * against the mapping and calls the notify hook (the binding makes Python raise at its next check).
 * A SIGBUS anywhere else keeps the default action. */
#ifndef DS_GUARD_H
#define DS_GUARD_H

#include <stddef.h>

/* Guards [base, base+len). label (copied) names the file in reports. Returns 0, or -1 when out of
 * memory (the mapping then works unguarded); there is no limit on the number of mappings.
 * Thread-safe. */
int mg_register(void *base, size_t len, const char *label);

/* Stops guarding the mapping that starts at base (no-op for an address never registered). */
void mg_unregister(void *base);

/* Installs the SIGBUS handler once; notify (may be NULL) runs inside the signal handler after a
 * guarded fault, so it must be async-signal-safe. Returns 0, or -1 with errno set. */
int mg_install(void (*notify)(void));

/* The labels of mappings that faulted since the last call (at most max, each once); their fault
 * counts restart at zero. Returns how many were written; the caller frees each label. */
size_t mg_take_faults(char **labels, size_t max);

#endif
