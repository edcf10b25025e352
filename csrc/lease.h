/* lease.h: file mappings that keep their bytes when the file is changed in place.
 *
 * A tensor that is a view of a private file mapping reads the file's page-cache pages until it is
 * written to: a write to the file through another descriptor shows through it, and a truncation
 * takes its pages away (SIGBUS past the new end, zeros in the page that holds it). Linux tells a
 * holder of a read lease before either can happen: the writer's open(O_WRONLY/O_RDWR/O_TRUNC) or
 * truncate() waits while the holder is signalled. A protected mapping is copied into anonymous
 * memory at the same address when that happens, then the lease is given back and the writer goes
 * on: the tensors keep the bytes they had, whichever thread reads them. Renaming a new file over
 * the old one (os.replace) needs no copy: the mapping keeps the old inode.
 *
 * Leases need the process to own the file (or CAP_LEASE), a local file system that supports them,
 * no writer holding the file open, and one descriptor kept open per mapping (at most a quarter
 * of RLIMIT_NOFILE, and 4096, are used). Where ml_protect cannot take a lease the caller decides:
 * the loader reads such a file into anonymous memory instead of mapping it. A copy costs the size
 * of the ranges tensors use, so only mappings whose tensors are resident anyway are protected
 * (loads and map_ranges), not DiskMap's lazy whole-file mappings. */
#ifndef DS_LEASE_H
#define DS_LEASE_H

#include <stddef.h>
#include <stdint.h>

/* Protects the mapping [base, base+len) of the file open (read-only) on fd: takes a read lease on
 * a duplicate of fd. offs/lens (n_ranges of them, copied) name the ranges that tensors use, the
 * only bytes a break copies (the rest of the mapping then reads zeros); offs NULL: all of it.
 * Returns 0, or -1 when no lease could be taken (the mapping is then not protected). Thread-safe;
 * runs without the GIL. */
int ml_protect(void *base, size_t len, int fd, const uint64_t *offs, const uint64_t *lens, size_t n_ranges);

/* Stops protecting the mapping at base (gives its lease back); call before unmapping it. No-op
 * for an address never protected. Waits while the mapping is being copied. */
void ml_release(void *base);

#endif
