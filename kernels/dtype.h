/* dtype.h: element conversions between F32, F16, BF16, F8_E4M3 (fn) and F8_E5M2,
 * written once for the CPU (csrc/convert.c) and the GPU (kernels/cast.cu).
 *
 * Each function reproduces what torch's `.to(dtype)` gives, bit for bit:
 * round-to-nearest-even, subnormals kept, overflow to inf (F16, BF16, E5M2).
 * torch itself is not uniform where a result has no exact answer, so those
 * places take a parameter and the callers pick what torch does there:
 *   - the bits of a NaN. On x86 CPUs torch's vectorised F32->BF16 gives 0xFFFF
 *     while its scalar casts (F16/F8 -> BF16) give 0x7FC0; F16C keeps a NaN's
 *     payload (DS_NAN_CPU); CUDA's conversion instructions give the canonical
 *     0x7FFF (DS_NAN_CUDA).
 *   - E4M3 (fn: no inf) overflow. c10's scalar cast turns |x| >= 480 and inf
 *     into NaN; torch's AVX-512 cast saturates them to +-448.
 * The F8 algorithms are those of c10's Float8 types. The Python side checks
 * these choices against the installed torch before it trusts them
 * (diffsynth_c/loader/conversion.py) and lets torch convert otherwise.
 *
 * Everything is plain integer and float arithmetic on 32-bit words; the float
 * additions in the subnormal paths need round-to-nearest without flush-to-zero
 * (the default on the CPU, and nvcc's without --use_fast_math). */
#ifndef DS_DTYPE_H
#define DS_DTYPE_H

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define DS_HD __host__ __device__ __forceinline__ static
#else
#define DS_HD static inline
#endif

typedef enum { DS_NAN_CPU = 0, DS_NAN_CUDA = 1 } ds_nan;

DS_HD float ds_f32(uint32_t bits) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(bits);
#else
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

DS_HD uint32_t ds_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

/* ---- BF16 ---- */

DS_HD uint32_t ds_bf16_to_f32(uint16_t h) { return (uint32_t)h << 16; }

/* nan_bits: what a NaN becomes (0xFFFF, 0x7FC0 or 0x7FFF, see above). */
DS_HD uint16_t ds_f32_to_bf16(uint32_t x, uint16_t nan_bits) {
    if ((x & 0x7FFFFFFFu) > 0x7F800000u)
        return nan_bits;
    return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

/* ---- F16 ---- */

DS_HD uint32_t ds_f16_to_f32(uint16_t h, ds_nan nan) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) {
        if (!m)
            return sign | 0x7F800000u;
        return nan == DS_NAN_CPU ? (sign | 0x7FC00000u | (m << 13)) : 0x7FFFFFFFu;
    }
    if (e == 0) {
        if (!m)
            return sign;
        /* subnormal: m * 2^-24, renormalised */
        uint32_t shift = 0;
        while (!(m & 0x400u)) {
            m <<= 1;
            shift++;
        }
        return sign | ((113u - shift) << 23) | ((m & 0x3FFu) << 13);
    }
    return sign | ((e + 112u) << 23) | (m << 13);
}

DS_HD uint16_t ds_f32_to_f16(uint32_t x, ds_nan nan) {
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7FFFFFFFu;
    if (x > 0x7F800000u)
        return nan == DS_NAN_CPU ? (uint16_t)(sign | 0x7E00u | ((x >> 13) & 0x3FFu)) : (uint16_t)0x7FFFu;
    if (x >= 0x477FF000u) /* 65520 and above round to inf */
        return (uint16_t)(sign | 0x7C00u);
    if (x >= 0x38800000u) { /* normal result */
        uint32_t odd = (x >> 13) & 1u;
        x += 0xC8000FFFu + odd; /* rebias the exponent by (15 - 127), round half to even */
        return (uint16_t)(sign | (x >> 13));
    }
    /* subnormal or zero: adding 0.5 lets the FPU round the bits into place */
    uint32_t r = ds_bits(ds_f32(x) + 0.5f) - 0x3F000000u;
    return (uint16_t)(sign | r);
}

/* ---- F8 E4M3 (fn: no inf, 0x7F and 0xFF are NaN, max 448) ---- */

DS_HD uint32_t ds_e4m3_to_f32(uint8_t v) {
    uint32_t w = (uint32_t)v << 24;
    uint32_t sign = w & 0x80000000u;
    uint32_t nonsign = w & 0x7FFFFFFFu;
    if (nonsign == 0)
        return sign;
    uint32_t lz = 0;
    while (!(nonsign & (0x80000000u >> lz)))
        lz++;
    uint32_t renorm = lz > 4 ? lz - 4 : 0;
    uint32_t inf_nan = (uint32_t)(((int32_t)(nonsign + 0x01000000u)) >> 8) & 0x7F800000u;
    return sign | ((((nonsign << renorm) >> 4) + ((0x78u - renorm) << 23)) | inf_nan);
}

/* saturate: overflow and inf become +-448 (torch's AVX-512 cast) instead of
 * NaN (c10's scalar cast). A NaN stays NaN either way. */
DS_HD uint8_t ds_f32_to_e4m3(uint32_t x, int saturate) {
    uint32_t sign = x & 0x80000000u;
    uint8_t r;
    x ^= sign;
    if (x >= (1087u << 20)) { /* 480 and above, inf and NaN */
        r = (saturate && x <= 0x7F800000u) ? 0x7E : 0x7F;
    } else if (x < (121u << 23)) { /* below 2^-6: subnormal, rounded by the FPU */
        r = (uint8_t)(ds_bits(ds_f32(x) + ds_f32(141u << 23)) - (141u << 23));
    } else {
        uint32_t odd = (x >> 20) & 1u;
        x += ((uint32_t)(7 - 127) << 23) + 0x7FFFFu + odd;
        r = (uint8_t)(x >> 20);
        if (saturate && r == 0x7F) /* rounded up into the NaN pattern */
            r = 0x7E;
    }
    return (uint8_t)(r | (sign >> 24));
}

/* ---- F8 E5M2 (the top byte of an F16) ---- */

/* c10 widens E5M2 through its software F16 -> F32 (fp16_ieee_to_fp32_value), not through the
 * hardware's: on CUDA the float multiply in it turns a NaN into the canonical 0x7FFFFFFF, and the
 * sign is ORed back afterwards, so a negative NaN becomes 0xFFFFFFFF. */
DS_HD uint32_t ds_e5m2_to_f32(uint8_t v, ds_nan nan) {
    uint32_t r = ds_f16_to_f32((uint16_t)((uint16_t)v << 8), nan);
    if (nan == DS_NAN_CUDA && (r & 0x7FFFFFFFu) > 0x7F800000u)
        r = ((uint32_t)(v & 0x80u) << 24) | 0x7FFFFFFFu;
    return r;
}

DS_HD uint8_t ds_f32_to_e5m2(uint32_t x) {
    uint32_t sign = x & 0x80000000u;
    uint8_t r;
    x ^= sign;
    if (x >= (143u << 23)) { /* 65536 and above: inf, or NaN for NaN */
        r = x > 0x7F800000u ? 0x7F : 0x7C;
    } else if (x < (113u << 23)) { /* below 2^-14: subnormal */
        r = (uint8_t)(ds_bits(ds_f32(x) + ds_f32(134u << 23)) - (134u << 23));
    } else {
        uint32_t odd = (x >> 21) & 1u;
        x += ((uint32_t)(15 - 127) << 23) + 0xFFFFFu + odd;
        r = (uint8_t)(x >> 21);
    }
    return (uint8_t)(r | (sign >> 24));
}

/* ---- by dtype code at run time ----
 * Codes: 0 F32, 1 F16, 2 BF16, 3 F8_E4M3, 4 F8_E5M2 (dsk_dtype of kernels/ds_cuda.h). nan picks the
 * NaN rule (DS_NAN_CPU / DS_NAN_CUDA; a BF16 NaN is then 0x7FC0 / 0x7FFF), saturate the E4M3 one.
 * The kernels compile these per dtype pair; the C core runs them to check that arithmetic. */

DS_HD uint32_t ds_any_to_f32(int t, uint32_t v, ds_nan nan) {
    switch (t) {
    case 1: return ds_f16_to_f32((uint16_t)v, nan);
    case 2: return ds_bf16_to_f32((uint16_t)v);
    case 3: return ds_e4m3_to_f32((uint8_t)v);
    case 4: return ds_e5m2_to_f32((uint8_t)v, nan);
    default: return v;
    }
}

DS_HD uint32_t ds_f32_to_any(int t, uint32_t x, ds_nan nan, int saturate) {
    switch (t) {
    case 1: return ds_f32_to_f16(x, nan);
    case 2: return ds_f32_to_bf16(x, nan == DS_NAN_CUDA ? (uint16_t)0x7FFF : (uint16_t)0x7FC0);
    case 3: return ds_f32_to_e4m3(x, saturate);
    case 4: return ds_f32_to_e5m2(x);
    default: return x;
    }
}

/* One element from dtype s to dtype d (the same dtype: the bits unchanged). */
DS_HD uint32_t ds_convert_any(int s, int d, uint32_t v, ds_nan nan, int saturate) {
    return s == d ? v : ds_f32_to_any(d, ds_any_to_f32(s, v, nan), nan, saturate);
}

#endif
