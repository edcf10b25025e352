/* common.cuh: what the .cu files of the CUDA library share: element storage types, the element
 * conversion of kernels/dtype.h by dtype (compile time), and the CUDA error plumbing of
 * ds_cuda.h (a message naming the call and CUDA's error string). */
#ifndef DS_COMMON_CUH
#define DS_COMMON_CUH

#ifdef DSK_FAKE_CUDA /* tests/cuda_fake: the host logic built with g++ and run on the CPU */
#include "fake_cuda.h"
#else
#include <cuda_runtime.h>
#endif
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#include "ds_cuda.h"
#include "dtype.h"

/* ---- element types ---- */

template <int T> struct dsk_elem;
template <> struct dsk_elem<DSK_F32> { typedef uint32_t type; };
template <> struct dsk_elem<DSK_F16> { typedef uint16_t type; };
template <> struct dsk_elem<DSK_BF16> { typedef uint16_t type; };
template <> struct dsk_elem<DSK_E4M3> { typedef uint8_t type; };
template <> struct dsk_elem<DSK_E5M2> { typedef uint8_t type; };

static inline size_t dsk_size(int t) { return t == DSK_F32 ? 4 : (t == DSK_F16 || t == DSK_BF16) ? 2 : 1; }

template <int S, int D>
__host__ __device__ __forceinline__ static typename dsk_elem<D>::type dsk_convert(typename dsk_elem<S>::type v,
                                                                                  dsk_rules r) {
    return (typename dsk_elem<D>::type)ds_convert_any(S, D, (uint32_t)v, (ds_nan)r.nan, r.saturate);
}

/* Element of dtype T as F32 bits (the norms read their inputs this way). */
template <int T>
__host__ __device__ __forceinline__ static uint32_t dsk_to_f32(typename dsk_elem<T>::type v, dsk_rules r) {
    return ds_any_to_f32(T, (uint32_t)v, (ds_nan)r.nan);
}

template <int T>
__host__ __device__ __forceinline__ static typename dsk_elem<T>::type dsk_from_f32(uint32_t x, dsk_rules r) {
    return (typename dsk_elem<T>::type)ds_f32_to_any(T, x, (ds_nan)r.nan, r.saturate);
}

/* Calls f.template operator()<S, D>() for the runtime pair (s, d); returns 0, or -1 for a pair
 * outside the five types. */
template <typename F> static int dsk_dispatch(int s, int d, F &&f) {
#define DSK_D(S)                                                                                                       \
    switch (d) {                                                                                                       \
    case DSK_F32: f.template operator()<S, DSK_F32>(); return 0;                                                       \
    case DSK_F16: f.template operator()<S, DSK_F16>(); return 0;                                                       \
    case DSK_BF16: f.template operator()<S, DSK_BF16>(); return 0;                                                     \
    case DSK_E4M3: f.template operator()<S, DSK_E4M3>(); return 0;                                                     \
    case DSK_E5M2: f.template operator()<S, DSK_E5M2>(); return 0;                                                     \
    default: return -1;                                                                                                \
    }
    switch (s) {
    case DSK_F32: DSK_D(DSK_F32)
    case DSK_F16: DSK_D(DSK_F16)
    case DSK_BF16: DSK_D(DSK_BF16)
    case DSK_E4M3: DSK_D(DSK_E4M3)
    case DSK_E5M2: DSK_D(DSK_E5M2)
    default: return -1;
    }
#undef DSK_D
}

/* ---- vector access ---- */

#ifdef __CUDACC__
/* Loads or stores 8 elements of T at p, 8*sizeof(T) bytes aligned to min(16, 8*sizeof(T)). */
template <typename T> __device__ __forceinline__ static void load8(const T *p, T v[8]) {
    if (sizeof(T) == 1) {
        uint2 a = *reinterpret_cast<const uint2 *>(p);
        memcpy(v, &a, 8);
    } else if (sizeof(T) == 2) {
        uint4 a = *reinterpret_cast<const uint4 *>(p);
        memcpy(v, &a, 16);
    } else {
        uint4 a = reinterpret_cast<const uint4 *>(p)[0], b = reinterpret_cast<const uint4 *>(p)[1];
        memcpy(v, &a, 16);
        memcpy(v + 4, &b, 16);
    }
}

template <typename T> __device__ __forceinline__ static void store8(T *p, const T v[8]) {
    if (sizeof(T) == 1) {
        uint2 a;
        memcpy(&a, v, 8);
        *reinterpret_cast<uint2 *>(p) = a;
    } else if (sizeof(T) == 2) {
        uint4 a;
        memcpy(&a, v, 16);
        *reinterpret_cast<uint4 *>(p) = a;
    } else {
        uint4 a, b;
        memcpy(&a, v, 16);
        memcpy(&b, v + 4, 16);
        reinterpret_cast<uint4 *>(p)[0] = a;
        reinterpret_cast<uint4 *>(p)[1] = b;
    }
}
#endif

/* ---- errors ---- */

__attribute__((format(printf, 3, 4))) static inline int dsk_fail(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* Fails with "what: CUDA's error name: its string" when rc is not cudaSuccess. */
static inline int dsk_check(cudaError_t rc, const char *what, char *err, size_t errlen) {
    if (rc == cudaSuccess)
        return 0;
    /* reported here, so cleared: a later launch's cudaGetLastError must not report it again (a
     * sticky error, one that breaks the context, stays whatever we do) */
    (void)cudaGetLastError();
    return dsk_fail(err, errlen, "%s: %s: %s", what, cudaGetErrorName(rc), cudaGetErrorString(rc));
}

/* Makes `device` current on this thread for the life of the guard, then gives the thread back the
 * device it had: the runtimes of this library and of torch share the thread's current context, so
 * a call on cuda:1 must not leave torch's current device changed. */
struct dsk_device_guard {
    int prev = -1, dev = -1;
    int enter(int device, char *err, size_t errlen) {
        if (cudaGetDevice(&prev) != cudaSuccess)
            prev = -1;
        dev = device;
        if (prev == device)
            return 0;
        return dsk_check(cudaSetDevice(device), "cudaSetDevice", err, errlen);
    }
    ~dsk_device_guard() {
        if (prev >= 0 && prev != dev)
            cudaSetDevice(prev);
    }
};

/* Blocks to launch for `work` items of `per_block` each, capped for grid-stride loops. */
static inline unsigned dsk_blocks(size_t work, size_t per_block) {
    size_t b = (work + per_block - 1) / per_block;
    if (b < 1)
        b = 1;
    return (unsigned)(b > 65536 ? 65536 : b);
}

#endif
