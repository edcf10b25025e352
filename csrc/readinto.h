/* readinto.h: parallel reads of tensors into memory the caller owns (pinned host buffers that
 * torch allocated, for instance), converting dtypes on the way where asked. */
#ifndef DS_READINTO_H
#define DS_READINTO_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "safetensors.h"

typedef struct {
    int fd;
    int file;         /* index reported in err->input on failure */
    st_dtype src;     /* dtype in the file */
    st_dtype dst;     /* dtype written; equal to src for a plain copy */
    uint64_t offset;  /* absolute file offset */
    uint64_t nbytes;  /* bytes in the file */
    void *out;        /* nbytes / size(src) * size(dst) bytes */
    const char *name; /* tensor key, for messages */
} ri_item;

/* Reads every item on up to `threads` threads. A conversion pair must satisfy cv_supported.
 * Returns 0, or -1 with err (a short read names the tensor). Runs without the GIL. */
int ri_run(const ri_item *items, size_t n, int threads, ds_error *err);

#endif
