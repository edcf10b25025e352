/* ds_cuda.h: the C interface of the CUDA library (diffsynth_c/_cuda*.so), built from the .cu files
 * of kernels/ when nvcc is found and opened on demand by csrc/cuda.c. The C core never links against CUDA: a
 * machine without nvcc at build time or without a GPU at run time still imports everything else.
 *
 * Every function returns 0 on success, or -1 with a message in err (errlen bytes, NUL-terminated)
 * that names what failed and carries CUDA's own error string. Streams are cudaStream_t values
 * passed as void * (0 is the legacy default stream); every launch and copy goes on the stream the
 * caller names, on the device the caller names (the calling thread's current device is set to it). */
#ifndef DS_CUDA_H
#define DS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with hidden visibility; these are its only exported symbols. */
#define DSK_API __attribute__((visibility("default")))

/* Bumped whenever a signature below changes; csrc/cuda.c refuses a library of another version. */
#define DSK_ABI_VERSION 1

/* Element types the kernels convert between. */
typedef enum { DSK_F32 = 0, DSK_F16 = 1, DSK_BF16 = 2, DSK_E4M3 = 3, DSK_E5M2 = 4, DSK_NTYPES = 5 } dsk_dtype;

/* How a conversion resolves the places where torch has a choice (kernels/dtype.h): the bits of a
 * NaN (0: DS_NAN_CPU, 1: DS_NAN_CUDA) and whether F8_E4M3 saturates on overflow. */
typedef struct {
    int nan;
    int saturate;
} dsk_rules;

DSK_API int dsk_abi_version(void);

/* Number of CUDA devices the driver sees (0 when there is no driver or no device); err says why
 * when it is 0. */
DSK_API int dsk_device_count(char *err, size_t errlen);

/* dst[i] = src[i] converted, n elements, both contiguous memory of CUDA device `device`. */
DSK_API int dsk_cast(int device, const void *src, dsk_dtype src_t, void *dst, dsk_dtype dst_t, size_t n,
                     dsk_rules rules, void *stream, char *err, size_t errlen);

/* Over the last dimension (cols) of rows x cols contiguous elements: y = x / sqrt(mean(x^2) + eps) * w
 * (w may be NULL), accumulated in F32. x and y share dtype t, w has dtype w_t. */
DSK_API int dsk_rms_norm(int device, const void *x, void *y, dsk_dtype t, const void *w, dsk_dtype w_t, size_t rows,
                         size_t cols, float eps, void *stream, char *err, size_t errlen);

/* y = (x - mean) / sqrt(var + eps) * w + b over the last dimension (w and b may be NULL). */
DSK_API int dsk_layer_norm(int device, const void *x, void *y, dsk_dtype t, const void *w, const void *b, dsk_dtype w_t,
                           size_t rows, size_t cols, float eps, void *stream, char *err, size_t errlen);

/* One tensor of a GPU load: nbytes at file offset of file fd, landing at dst (device memory) as
 * dst_t. src_t < 0 means "copy the bytes as they are" (any dtype; dst_t ignored). */
typedef struct {
    int fd;
    int src_t;
    int dst_t;
    uint64_t offset;
    uint64_t nbytes;
    void *dst;
} dsk_item;

/* Reads the items from their files into pinned staging buffers on `threads` threads, copies each
 * filled buffer to the device on a copy stream of the library's (ordered after the work queued on
 * `stream`, the stream the results were allocated on) while the next ones are read, and converts on the device
 * where src_t != dst_t. scratch (device memory, scratch_bytes) receives buffers that need a
 * conversion; its size fixes the staging size (split in at least two slots). Returns once every
 * copy and kernel is queued and the staging buffers are free again (the stream is synchronised).
 * On failure (short read, CUDA error) nothing is left running; *failed_item is the index of the
 * item whose read failed, or (size_t)-1 when the failure is not one item's. */
DSK_API int dsk_upload(int device, const dsk_item *items, size_t n, void *scratch, size_t scratch_bytes, int threads,
                       dsk_rules rules, void *stream, size_t *failed_item, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
