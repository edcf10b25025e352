/* cuda.h: the CUDA library (kernels/, built as diffsynth_c/_cuda*.so when nvcc is found), opened
 * on demand with dlopen so that the C core neither links against CUDA nor needs it to import. */
#ifndef DS_CUDA_LOADER_H
#define DS_CUDA_LOADER_H

#include <stddef.h>

#include "ds_cuda.h"

typedef struct {
    int (*device_count)(char *, size_t);
    int (*cast)(int, const void *, dsk_dtype, void *, dsk_dtype, size_t, dsk_rules, void *, char *, size_t);
    int (*rms_norm)(int, const void *, void *, dsk_dtype, const void *, dsk_dtype, size_t, size_t, float, void *,
                    char *, size_t);
    int (*layer_norm)(int, const void *, void *, dsk_dtype, const void *, const void *, dsk_dtype, size_t, size_t,
                      float, void *, char *, size_t);
    int (*upload)(int, const dsk_item *, size_t, void *, size_t, int, dsk_rules, void *, size_t *, char *, size_t);
    int device_is_host; /* the test stand-in (tests/cuda_fake): its device memory is host memory */
} cu_api;

/* Opens the library at path once (later calls return the same table, whatever the path). Returns
 * NULL with the reason in why (whylen bytes) when it cannot be opened, lacks a symbol or was built
 * for another interface version. Not thread-safe: call with the GIL held. */
const cu_api *cu_open(const char *path, char *why, size_t whylen);

/* The table when cu_open has succeeded, else NULL. */
const cu_api *cu_get(void);

#endif
