/* cast.cu: dtype conversion on the GPU (dsk_cast) and the scatter-convert kernel of the GPU load
 * path (dsk_launch_pieces). The element arithmetic is kernels/dtype.h, the same code the C core
 * runs on the CPU, so the CPU tests check these results bit for bit. */

#include "common.cuh"
#include "internal.cuh"

#define CAST_THREADS 256
#define CAST_VEC 8 /* elements per thread per step */

/* Aligned bulk: groups of 8 elements with vector loads and stores; the tail element by element. */
template <int S, int D>
__global__ void cast_vec_kernel(const typename dsk_elem<S>::type *src, typename dsk_elem<D>::type *dst, size_t n,
                                dsk_rules r) {
    typedef typename dsk_elem<S>::type in_t;
    typedef typename dsk_elem<D>::type out_t;
    size_t groups = n / CAST_VEC;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t g = (size_t)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
        in_t a[CAST_VEC];
        out_t b[CAST_VEC];
        load8(src + g * CAST_VEC, a);
#pragma unroll
        for (int k = 0; k < CAST_VEC; k++)
            b[k] = dsk_convert<S, D>(a[k], r);
        store8(dst + g * CAST_VEC, b);
    }
    for (size_t i = groups * CAST_VEC + (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = dsk_convert<S, D>(src[i], r);
}

/* Any alignment: element by element, coalesced. */
template <int S, int D>
__global__ void cast_scalar_kernel(const typename dsk_elem<S>::type *src, typename dsk_elem<D>::type *dst, size_t n,
                                   dsk_rules r) {
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = dsk_convert<S, D>(src[i], r);
}

namespace {
struct cast_launch {
    const void *src;
    void *dst;
    size_t n;
    dsk_rules r;
    cudaStream_t stream;
    unsigned max_blocks;
    template <int S, int D> void operator()() {
        typedef typename dsk_elem<S>::type in_t;
        typedef typename dsk_elem<D>::type out_t;
        size_t in_align = sizeof(in_t) * CAST_VEC < 16 ? sizeof(in_t) * CAST_VEC : 16;
        size_t out_align = sizeof(out_t) * CAST_VEC < 16 ? sizeof(out_t) * CAST_VEC : 16;
        int aligned = (uintptr_t)src % in_align == 0 && (uintptr_t)dst % out_align == 0;
        if (aligned) {
            unsigned blocks = dsk_blocks(n / CAST_VEC, CAST_THREADS);
            blocks = blocks < max_blocks ? blocks : max_blocks; /* a bare `<` inside <<<>>> trips clang-format */
            cast_vec_kernel<S, D><<<blocks, CAST_THREADS, 0, stream>>>((const in_t *)src, (out_t *)dst, n, r);
        } else {
            unsigned blocks = dsk_blocks(n, CAST_THREADS);
            blocks = blocks < max_blocks ? blocks : max_blocks;
            cast_scalar_kernel<S, D><<<blocks, CAST_THREADS, 0, stream>>>((const in_t *)src, (out_t *)dst, n, r);
        }
    }
};
} // namespace

/* Enough blocks to fill every SM several times over; more only adds scheduling. */
static unsigned max_cast_blocks(int device) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0)
        sms = 128;
    return (unsigned)sms * 8;
}

extern "C" int dsk_cast(int device, const void *src, dsk_dtype src_t, void *dst, dsk_dtype dst_t, size_t n,
                        dsk_rules rules, void *stream, char *err, size_t errlen) {
    dsk_device_guard guard;
    if (guard.enter(device, err, errlen))
        return -1;
    if (n == 0)
        return 0;
    cast_launch l = {src, dst, n, rules, (cudaStream_t)stream, max_cast_blocks(device)};
    if (dsk_dispatch(src_t, dst_t, l))
        return dsk_fail(err, errlen, "cast: unsupported dtype pair %d -> %d", (int)src_t, (int)dst_t);
    return dsk_check(cudaGetLastError(), "cast kernel launch", err, errlen);
}

/* ---- scatter-convert of a staged buffer (GPU load path) ---- */

#define PIECE_THREADS 256
#define PIECE_TILE 4096 /* elements per block */

template <int S, int D>
__device__ __forceinline__ static void piece_range(const uint8_t *src, void *dst, size_t begin, size_t end,
                                                   dsk_rules r) {
    const typename dsk_elem<S>::type *in = (const typename dsk_elem<S>::type *)src;
    typename dsk_elem<D>::type *out = (typename dsk_elem<D>::type *)dst;
    for (size_t i = begin + threadIdx.x; i < end; i += blockDim.x)
        out[i] = dsk_convert<S, D>(in[i], r);
}

#define PIECE_CASE_D(S)                                                                                                \
    switch (p.dst_t) {                                                                                                 \
    case DSK_F32: piece_range<S, DSK_F32>(in, p.dst, begin, end, r); break;                                            \
    case DSK_F16: piece_range<S, DSK_F16>(in, p.dst, begin, end, r); break;                                            \
    case DSK_BF16: piece_range<S, DSK_BF16>(in, p.dst, begin, end, r); break;                                          \
    case DSK_E4M3: piece_range<S, DSK_E4M3>(in, p.dst, begin, end, r); break;                                          \
    case DSK_E5M2: piece_range<S, DSK_E5M2>(in, p.dst, begin, end, r); break;                                          \
    }

/* One block per tile of PIECE_TILE elements; tile_begin (ascending) says where each piece's tiles
 * start, so a block finds its piece by binary search. */
__global__ void pieces_kernel(const dsk_piece *table, int npieces, const uint8_t *base, dsk_rules r) {
    unsigned tile = blockIdx.x;
    int lo = 0, hi = npieces - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (table[mid].tile_begin <= tile)
            lo = mid;
        else
            hi = mid - 1;
    }
    dsk_piece p = table[lo];
    size_t begin = (size_t)(tile - p.tile_begin) * PIECE_TILE;
    size_t end = begin + PIECE_TILE < p.n ? begin + PIECE_TILE : p.n;
    const uint8_t *in = base + p.src_off;
    switch (p.src_t) {
    case DSK_F32: PIECE_CASE_D(DSK_F32) break;
    case DSK_F16: PIECE_CASE_D(DSK_F16) break;
    case DSK_BF16: PIECE_CASE_D(DSK_BF16) break;
    case DSK_E4M3: PIECE_CASE_D(DSK_E4M3) break;
    case DSK_E5M2: PIECE_CASE_D(DSK_E5M2) break;
    }
}

unsigned dsk_piece_tiles(uint64_t n) { return (unsigned)((n + PIECE_TILE - 1) / PIECE_TILE); }

int dsk_launch_pieces(const dsk_piece *table, int npieces, unsigned tiles, const void *base, dsk_rules rules,
                      cudaStream_t stream, char *err, size_t errlen) {
    if (npieces == 0 || tiles == 0)
        return 0;
    pieces_kernel<<<tiles, PIECE_THREADS, 0, stream>>>(table, npieces, (const uint8_t *)base, rules);
    return dsk_check(cudaGetLastError(), "load: convert kernel launch", err, errlen);
}
