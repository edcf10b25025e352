/* internal.cuh: what the load path (upload.cu) uses of the cast kernels (cast.cu). */
#ifndef DS_INTERNAL_CUH
#define DS_INTERNAL_CUH

#ifdef DSK_FAKE_CUDA /* tests/cuda_fake: the host logic built with g++ and run on the CPU */
#include "fake_cuda.h"
#else
#include <cuda_runtime.h>
#endif
#include <stdint.h>

#include "ds_cuda.h"

/* One run of elements of a staged buffer to convert: src_off bytes into the buffer, n elements,
 * written from dst on. tile_begin: the first tile (block) of this piece in its buffer's launch. */
typedef struct {
    uint64_t src_off;
    void *dst;
    uint64_t n;
    uint32_t tile_begin;
    int32_t src_t;
    int32_t dst_t;
    int32_t pad;
} dsk_piece;

/* Tiles (blocks) a piece of n elements takes. */
unsigned dsk_piece_tiles(uint64_t n);

/* Converts the pieces of one staged buffer (table in device memory, base the buffer on the device). */
int dsk_launch_pieces(const dsk_piece *table, int npieces, unsigned tiles, const void *base, dsk_rules rules,
                      cudaStream_t stream, char *err, size_t errlen);

#endif
