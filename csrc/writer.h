/* writer.h: writing a safetensors file whole or not at all.
 *
 * The file is written under a temporary name in the same folder (path + ".tmp-<pid>"): the 8-byte
 * little-endian length of the header, the header, then each piece's bytes in order, pwritten in
 * 8 MiB tasks on worker threads; flushed with fsync, closed, and renamed over path only when
 * complete. On any failure the temporary file is removed and path is untouched. Plain C, no
 * Python: the binding (bind_write.c) calls it with the GIL released. Prefix: wr_. */
#ifndef DS_WRITER_H
#define DS_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef struct {
    const char *src; /* the caller keeps these bytes alive and unchanged during the write */
    uint64_t nbytes;
} wr_piece;

/* Writes header (already padded) and the n pieces to path as above, on up to `threads` threads.
 * Returns 0, or -1 with err. */
int wr_write_file(const char *path, const void *header, size_t header_len, const wr_piece *pieces, size_t n,
                  int threads, ds_error *err);

#endif
