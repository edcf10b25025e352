/* norm.cu: RMS norm and layer norm over the last dimension, one block per row, F32 accumulation.
 * A row is read with 16-byte loads when it is aligned for them; the second (and third) pass reads
 * it again from L1/L2, so the memory traffic is one read and one write of the row. */
#include "common.cuh"

#define NORM_THREADS 256

__device__ __forceinline__ static float block_sum(float v, float *shared) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads(); /* shared may still be read by a previous reduction */
    if (lane == 0)
        shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? shared[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

template <int T> __device__ __forceinline__ static float ld(const void *p, size_t i) {
    return ds_f32(dsk_to_f32<T>(((const typename dsk_elem<T>::type *)p)[i], dsk_rules{1, 0}));
}

/* Calls f(i, x[i]) for every element of a row, 8 at a time with vector loads when vec is set. */
template <int T, typename F>
__device__ __forceinline__ static void for_row(const void *row, size_t cols, int vec, F f) {
    typedef typename dsk_elem<T>::type e;
    if (vec) {
        for (size_t g = threadIdx.x; g < cols / 8; g += blockDim.x) {
            e v[8];
            load8((const e *)row + g * 8, v);
#pragma unroll
            for (int k = 0; k < 8; k++)
                f(g * 8 + k, ds_f32(dsk_to_f32<T>(v[k], dsk_rules{1, 0})));
        }
    } else {
        for (size_t i = threadIdx.x; i < cols; i += blockDim.x)
            f(i, ld<T>(row, i));
    }
}

/* Writes the row: y[i] = g(i, x[i]) rounded to T. */
template <int T, typename G>
__device__ __forceinline__ static void write_row(const void *row, void *out, size_t cols, int vec, G g) {
    typedef typename dsk_elem<T>::type e;
    const dsk_rules r = {1, 0};
    if (vec) {
        for (size_t q = threadIdx.x; q < cols / 8; q += blockDim.x) {
            e v[8];
            load8((const e *)row + q * 8, v);
#pragma unroll
            for (int k = 0; k < 8; k++)
                v[k] = dsk_from_f32<T>(ds_bits(g(q * 8 + k, ds_f32(dsk_to_f32<T>(v[k], r)))), r);
            store8((e *)out + q * 8, v);
        }
    } else {
        for (size_t i = threadIdx.x; i < cols; i += blockDim.x)
            ((e *)out)[i] = dsk_from_f32<T>(ds_bits(g(i, ld<T>(row, i))), r);
    }
}

template <int T, int W>
__global__ void rms_norm_kernel(const void *x, void *y, const void *w, size_t cols, float eps, int vec) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    size_t es = sizeof(typename dsk_elem<T>::type);
    const char *xr = (const char *)x + row * cols * es;
    char *yr = (char *)y + row * cols * es;
    float ss = 0.0f;
    for_row<T>(xr, cols, vec, [&](size_t, float v) { ss += v * v; });
    ss = block_sum(ss, shared);
    float rstd = rsqrtf(ss / (float)cols + eps);
    write_row<T>(xr, yr, cols, vec, [&](size_t i, float v) { return w ? v * rstd * ld<W>(w, i) : v * rstd; });
}

template <int T, int W>
__global__ void layer_norm_kernel(const void *x, void *y, const void *w, const void *b, size_t cols, float eps,
                                  int vec) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    size_t es = sizeof(typename dsk_elem<T>::type);
    const char *xr = (const char *)x + row * cols * es;
    char *yr = (char *)y + row * cols * es;
    float s = 0.0f;
    for_row<T>(xr, cols, vec, [&](size_t, float v) { s += v; });
    float mean = block_sum(s, shared) / (float)cols;
    float sq = 0.0f;
    for_row<T>(xr, cols, vec, [&](size_t, float v) { sq += (v - mean) * (v - mean); });
    float rstd = rsqrtf(block_sum(sq, shared) / (float)cols + eps);
    write_row<T>(xr, yr, cols, vec, [&](size_t i, float v) {
        float o = (v - mean) * rstd;
        if (w)
            o *= ld<W>(w, i);
        if (b)
            o += ld<W>(b, i);
        return o;
    });
}

static int norm_type_ok(int t) { return t == DSK_F32 || t == DSK_F16 || t == DSK_BF16; }

/* Rows are read with vector loads when every row starts on a 16-byte boundary. */
static int norm_vec(const void *x, const void *y, dsk_dtype t, size_t cols) {
    size_t es = dsk_size(t);
    return cols % 8 == 0 && (cols * es) % 16 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)y % 16 == 0;
}

namespace {
struct norm_launch {
    const void *x, *w, *b;
    void *y;
    size_t rows, cols;
    float eps;
    int layer, vec;
    cudaStream_t stream;
    template <int T, int W> void operator()() {
        if (!norm_type_ok(T) || !norm_type_ok(W))
            return;
        unsigned threads = cols >= 2048 ? NORM_THREADS : cols >= 512 ? 128 : 64;
        if (layer)
            layer_norm_kernel<T, W><<<(unsigned)rows, threads, 0, stream>>>(x, y, w, b, cols, eps, vec);
        else
            rms_norm_kernel<T, W><<<(unsigned)rows, threads, 0, stream>>>(x, y, w, cols, eps, vec);
    }
};
} // namespace

static int norm_run(int device, int layer, const void *x, void *y, dsk_dtype t, const void *w, const void *b,
                    dsk_dtype w_t, size_t rows, size_t cols, float eps, void *stream, char *err, size_t errlen) {
    const char *what = layer ? "layer_norm" : "rms_norm";
    if (!norm_type_ok(t) || !norm_type_ok(w_t))
        return dsk_fail(err, errlen, "%s: dtypes must be F32, F16 or BF16", what);
    if (rows > 0x7FFFFFFFu)
        return dsk_fail(err, errlen, "%s: %zu rows is more than one launch takes", what, rows);
    dsk_device_guard guard;
    if (guard.enter(device, err, errlen))
        return -1;
    if (rows == 0 || cols == 0)
        return 0;
    norm_launch l = {x, w, b, y, rows, cols, eps, layer, norm_vec(x, y, t, cols), (cudaStream_t)stream};
    dsk_dispatch(t, w_t, l);
    char what_launch[32];
    snprintf(what_launch, sizeof what_launch, "%s kernel launch", what);
    return dsk_check(cudaGetLastError(), what_launch, err, errlen);
}

extern "C" int dsk_rms_norm(int device, const void *x, void *y, dsk_dtype t, const void *w, dsk_dtype w_t, size_t rows,
                            size_t cols, float eps, void *stream, char *err, size_t errlen) {
    return norm_run(device, 0, x, y, t, w, NULL, w_t, rows, cols, eps, stream, err, errlen);
}

extern "C" int dsk_layer_norm(int device, const void *x, void *y, dsk_dtype t, const void *w, const void *b,
                              dsk_dtype w_t, size_t rows, size_t cols, float eps, void *stream, char *err,
                              size_t errlen) {
    return norm_run(device, 1, x, y, t, w, b, w_t, rows, cols, eps, stream, err, errlen);
}
