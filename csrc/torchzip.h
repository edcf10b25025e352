/* torchzip.h: the zip container that torch.save writes (PyTorch >= 1.6).
 *
 * Only what a checkpoint needs: the end-of-central-directory record (ZIP64 when the archive asks
 * for it), the central directory, and for each entry the position of its bytes, found through the
 * entry's *local* header (whose extra field pads payloads to 64 bytes). Entries must be stored
 * (method 0): torch never compresses, and a compressed entry is refused rather than inflated. All
 * offsets and sizes are checked against the file before they are used; no entry byte is read here.
 * A name that appears twice and entries whose bytes overlap are refused (torch.save writes neither;
 * which copy another reader takes depends on its zip library). Names are found through a hash
 * index, so opening and looking up every entry costs time linear in the directory. */
#ifndef DS_TORCHZIP_H
#define DS_TORCHZIP_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef struct {
    char *name; /* NUL-terminated, full path inside the archive */
    size_t name_len;
    uint64_t local;  /* of the entry's local header in the file */
    uint64_t offset; /* of the entry's first byte in the file */
    uint64_t size;
    uint64_t end; /* one past the entry's last stored byte in the file */
    int method;   /* 0: stored */
} tz_entry;

typedef struct {
    tz_entry *entries;
    size_t n;
    char *prefix; /* the archive's top folder with its '/', e.g. "model/" ("" when there is none) */
    size_t prefix_len;
    size_t *index;    /* open addressing over entries by name: entry number + 1, 0 when empty */
    size_t index_cap; /* a power of two */
} tz_archive;

/* Reads the directory of the zip file open as fd (file_size bytes). Returns 0, or -1 with err
 * (DS_ERR_UNSUPPORTED when the file is not a zip at all: the caller may try the legacy format). */
int tz_open(int fd, uint64_t file_size, tz_archive *a, ds_error *err);
void tz_free(tz_archive *a);

/* The entry named prefix + rel, or NULL. */
const tz_entry *tz_find(const tz_archive *a, const char *rel);

#endif
