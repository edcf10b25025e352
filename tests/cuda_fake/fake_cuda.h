/* fake_cuda.h: just enough of the CUDA runtime API for kernels/upload.cu to build with g++ and run
 * on the CPU, so that the GPU load's planning, staging ring, piece tables and error paths are
 * tested on machines without a GPU. "Device memory" is host memory; copies happen at once (in
 * stream order by construction); events and streams only count. Test-only: never shipped. */
#ifndef DS_FAKE_CUDA_H
#define DS_FAKE_CUDA_H

#include <stdlib.h>
#include <string.h>

#define __host__
#define __device__
#define __forceinline__ inline
#define __global__

typedef enum { cudaSuccess = 0, cudaErrorMemoryAllocation = 2, cudaErrorInvalidValue = 1 } cudaError_t;
typedef void *cudaStream_t;
typedef int *cudaEvent_t;
enum { cudaMemcpyHostToDevice = 1 };
enum { cudaStreamNonBlocking = 1, cudaEventDisableTiming = 2, cudaHostAllocPortable = 1 };

/* Knobs for the tests (fake_kernels.cpp): fail the n-th copy, count calls. */
extern int fake_fail_copy_at;
extern int fake_copies;

static inline const char *cudaGetErrorName(cudaError_t e) { return e ? "cudaErrorFake" : "cudaSuccess"; }
static inline const char *cudaGetErrorString(cudaError_t e) { return e ? "injected failure" : "no error"; }
static inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
static inline cudaError_t cudaGetDevice(int *d) {
    *d = 0;
    return cudaSuccess;
}
static inline cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
static inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
static inline cudaError_t cudaHostAlloc(void **p, size_t n, unsigned) {
    *p = malloc(n);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
static inline cudaError_t cudaFreeHost(void *p) {
    free(p);
    return cudaSuccess;
}
static inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned) {
    static int x;
    *s = &x;
    return cudaSuccess;
}
static inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned) {
    static int y;
    *e = &y;
    return cudaSuccess;
}
static inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
static inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
static inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
static inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
static inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, int, cudaStream_t) {
    if (++fake_copies == fake_fail_copy_at)
        return cudaErrorInvalidValue;
    memcpy(d, s, n);
    return cudaSuccess;
}

#endif
