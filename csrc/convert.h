/* convert.h: dtype conversion of element runs on the CPU, bit-identical to
 * torch's `.to(dtype)` there. The element math is kernels/dtype.h, shared with
 * the GPU cast kernel. */
#ifndef DS_CONVERT_H
#define DS_CONVERT_H

#include <stddef.h>

#include "safetensors.h"

/* Whether cv_run converts src to dst (F32, F16, BF16, F8_E4M3, F8_E5M2, any pair). */
int cv_supported(st_dtype src, st_dtype dst);

/* Converts n elements from in (dtype src) to out (dtype dst). in and out must
 * not overlap. Both dtypes must satisfy cv_supported. */
void cv_run(st_dtype src, st_dtype dst, const void *in, void *out, size_t n);

/* cv_run with the F16C instructions allowed (when present) or not: the tests
 * check that both give the same bits. */
void cv_run_with(st_dtype src, st_dtype dst, const void *in, void *out, size_t n, int f16c);

/* cv_run element by element with the GPU kernels' rules (kernels/dtype.h): nan 0 (DS_NAN_CPU) or
 * 1 (DS_NAN_CUDA), saturate for E4M3 overflow. What the CUDA cast computes, checked on the CPU. */
void cv_run_rules(st_dtype src, st_dtype dst, const void *in, void *out, size_t n, int nan, int saturate);

/* Which implementation F32<->F16 uses here: "f16c" or "portable". */
const char *cv_f16_impl(void);

#endif
