/* fake_kernels.cpp: the device side of the GPU load for tests/cuda_fake, on the CPU: the convert
 * kernel walks the piece table the way pieces_kernel does (same helpers of kernels/dtype.h), and
 * the other entry points of ds_cuda.h answer "not in this build". */
#include "common.cuh"
#include "internal.cuh"

int fake_fail_copy_at = -1;
int fake_copies = 0;

/* Tells the C core (csrc/cuda.c) that this library's device memory is host memory, so that
 * cuda_upload accepts CPU tensors as its destinations. */
extern "C" DSK_API const int dsk_fake_device_is_host = 1;

extern "C" DSK_API void fake_set_fail_copy_at(int n) {
    fake_fail_copy_at = n;
    fake_copies = 0;
}

#define TILE 4096

unsigned dsk_piece_tiles(uint64_t n) { return (unsigned)((n + TILE - 1) / TILE); }

int dsk_launch_pieces(const dsk_piece *table, int npieces, unsigned tiles, const void *base, dsk_rules r, cudaStream_t,
                      char *err, size_t errlen) {
    unsigned expect = 0;
    for (int p = 0; p < npieces; p++) {
        const dsk_piece &e = table[p];
        if (e.tile_begin != expect)
            return dsk_fail(err, errlen, "piece %d: tile_begin %u, expected %u", p, e.tile_begin, expect);
        expect += dsk_piece_tiles(e.n);
        size_t is = dsk_size(e.src_t), os = dsk_size(e.dst_t);
        const uint8_t *in = (const uint8_t *)base + e.src_off;
        for (uint64_t i = 0; i < e.n; i++) {
            uint32_t v = 0;
            memcpy(&v, in + i * is, is);
            uint32_t o = ds_convert_any(e.src_t, e.dst_t, v, (ds_nan)r.nan, r.saturate);
            memcpy((uint8_t *)e.dst + i * os, &o, os);
        }
    }
    if (expect != tiles)
        return dsk_fail(err, errlen, "launch of %u tiles for pieces that take %u", tiles, expect);
    return 0;
}

extern "C" int dsk_cast(int, const void *, dsk_dtype, void *, dsk_dtype, size_t, dsk_rules, void *, char *err,
                        size_t errlen) {
    return dsk_fail(err, errlen, "fake build: no cast");
}

extern "C" int dsk_rms_norm(int, const void *, void *, dsk_dtype, const void *, dsk_dtype, size_t, size_t, float,
                            void *, char *err, size_t errlen) {
    return dsk_fail(err, errlen, "fake build: no rms_norm");
}

extern "C" int dsk_layer_norm(int, const void *, void *, dsk_dtype, const void *, const void *, dsk_dtype, size_t,
                              size_t, float, void *, char *err, size_t errlen) {
    return dsk_fail(err, errlen, "fake build: no layer_norm");
}
