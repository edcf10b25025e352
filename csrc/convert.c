/* convert.c: CPU conversion loops (contract in convert.h).
 *
 * Every pair goes through F32, element by element, with the shared helpers
 * of kernels/dtype.h; the compiler vectorises the integer ones. The rules where
 * torch has a choice are those of torch on x86-64 (see dtype.h): BF16 NaN
 * 0xFFFF from F32 and 0x7FC0 from other dtypes, E4M3 saturating. F32<->F16 uses
 * the F16C instructions when the processor has them: they are what torch itself
 * runs on x86, and the portable helper reproduces them (tests compare the two).
 * Loops work on blocks of 1024 elements through a small F32 buffer so that each
 * pass stays in L1. */
#include "convert.h"

#include <stdint.h>
#include <string.h>

#include "dtype.h"

/* CV_NO_F16C: the portable path only (scripts/fuzz.sh: clang 14 knows no "f16c" feature string). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(CV_NO_F16C)
#include <immintrin.h>
#define CV_HAVE_F16C_PATH 1
#endif

int cv_supported(st_dtype src, st_dtype dst) {
    int ok_src = src == ST_F32 || src == ST_F16 || src == ST_BF16 || src == ST_F8_E4M3 || src == ST_F8_E5M2;
    int ok_dst = dst == ST_F32 || dst == ST_F16 || dst == ST_BF16 || dst == ST_F8_E4M3 || dst == ST_F8_E5M2;
    return ok_src && ok_dst;
}

#ifdef CV_HAVE_F16C_PATH
__attribute__((target("avx2,f16c"))) static void f16_to_f32_f16c(const uint16_t *in, uint32_t *out, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(in + i));
        _mm256_storeu_ps((float *)(out + i), _mm256_cvtph_ps(h));
    }
    for (; i < n; i++) {
        __m128i h = _mm_cvtsi32_si128(in[i]);
        out[i] = (uint32_t)_mm_cvtsi128_si32(_mm_castps_si128(_mm_cvtph_ps(h)));
    }
}

__attribute__((target("avx2,f16c"))) static void f32_to_f16_f16c(const uint32_t *in, uint16_t *out, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 f = _mm256_loadu_ps((const float *)(in + i));
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) {
        __m128 f = _mm_castsi128_ps(_mm_cvtsi32_si128((int)in[i]));
        out[i] = (uint16_t)_mm_cvtsi128_si32(_mm_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
    }
}

static int have_f16c(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2");
    }
    return cached;
}
#else
static int have_f16c(void) { return 0; }
#endif

const char *cv_f16_impl(void) { return have_f16c() ? "f16c" : "portable"; }

/* in: n elements of src; out: n F32 words */
static void to_f32(st_dtype src, const void *in, uint32_t *out, size_t n, int f16c) {
    switch (src) {
    case ST_F32: memcpy(out, in, n * 4); break;
    case ST_BF16: {
        const uint16_t *p = in;
        for (size_t i = 0; i < n; i++)
            out[i] = ds_bf16_to_f32(p[i]);
        break;
    }
    case ST_F16: {
#ifdef CV_HAVE_F16C_PATH
        if (f16c) {
            f16_to_f32_f16c(in, out, n);
            break;
        }
#endif
        const uint16_t *p = in;
        for (size_t i = 0; i < n; i++)
            out[i] = ds_f16_to_f32(p[i], DS_NAN_CPU);
        break;
    }
    case ST_F8_E4M3: {
        const uint8_t *p = in;
        for (size_t i = 0; i < n; i++)
            out[i] = ds_e4m3_to_f32(p[i]);
        break;
    }
    case ST_F8_E5M2: {
        const uint8_t *p = in;
        for (size_t i = 0; i < n; i++)
            out[i] = ds_e5m2_to_f32(p[i], DS_NAN_CPU);
        break;
    }
    default: break;
    }
}

/* bf16_nan: the BF16 pattern of a NaN (torch's vectorised F32 cast gives 0xFFFF,
 * its scalar casts from other dtypes 0x7FC0). */
static void from_f32(st_dtype dst, const uint32_t *in, void *out, size_t n, int f16c, uint16_t bf16_nan) {
    switch (dst) {
    case ST_F32: memcpy(out, in, n * 4); break;
    case ST_BF16: {
        uint16_t *p = out;
        for (size_t i = 0; i < n; i++)
            p[i] = ds_f32_to_bf16(in[i], bf16_nan);
        break;
    }
    case ST_F16: {
#ifdef CV_HAVE_F16C_PATH
        if (f16c) {
            f32_to_f16_f16c(in, out, n);
            break;
        }
#endif
        uint16_t *p = out;
        for (size_t i = 0; i < n; i++)
            p[i] = ds_f32_to_f16(in[i], DS_NAN_CPU);
        break;
    }
    case ST_F8_E4M3: {
        uint8_t *p = out;
        for (size_t i = 0; i < n; i++)
            p[i] = ds_f32_to_e4m3(in[i], 1);
        break;
    }
    case ST_F8_E5M2: {
        uint8_t *p = out;
        for (size_t i = 0; i < n; i++)
            p[i] = ds_f32_to_e5m2(in[i]);
        break;
    }
    default: break;
    }
}

/* 8-bit sources: the 256 possible results are computed once per call by the element path below,
 * then every element is a table lookup (bit-identical by construction, several times faster than
 * converting each element through F32). Worth it from a few thousand elements. */
enum { CV_LUT_MIN = 4096 };

#ifdef CV_HAVE_F16C_PATH
/* The 16-bit table lookup, 64 elements at a time (AVX-512 VBMI): the table split into its low and
 * high bytes, each looked up by two 128-entry byte permutes chosen by the code's top bit, then the
 * bytes interleaved back into words in element order. Same table, so the same bits as the loop.
 * Returns how many elements it converted (a multiple of 64). */
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) static size_t lut16_vbmi(const uint8_t *in, uint16_t *out,
                                                                                size_t n, const uint16_t *lut) {
    uint8_t lo[256], hi[256];
    for (int i = 0; i < 256; i++) {
        lo[i] = (uint8_t)lut[i];
        hi[i] = (uint8_t)(lut[i] >> 8);
    }
    const __m512i lo0 = _mm512_loadu_si512(lo), lo1 = _mm512_loadu_si512(lo + 64);
    const __m512i lo2 = _mm512_loadu_si512(lo + 128), lo3 = _mm512_loadu_si512(lo + 192);
    const __m512i hi0 = _mm512_loadu_si512(hi), hi1 = _mm512_loadu_si512(hi + 64);
    const __m512i hi2 = _mm512_loadu_si512(hi + 128), hi3 = _mm512_loadu_si512(hi + 192);
    /* unpacklo/hi interleave within 128-bit lanes: a holds bytes 0-7 of each lane, b bytes 8-15 */
    const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512i x = _mm512_loadu_si512(in + i);
        __mmask64 top = _mm512_movepi8_mask(x);
        __m512i l =
            _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(lo0, x, lo1), _mm512_permutex2var_epi8(lo2, x, lo3));
        __m512i h =
            _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(hi0, x, hi1), _mm512_permutex2var_epi8(hi2, x, hi3));
        __m512i a = _mm512_unpacklo_epi8(l, h), b = _mm512_unpackhi_epi8(l, h);
        _mm512_storeu_si512(out + i, _mm512_permutex2var_epi64(a, first, b));
        _mm512_storeu_si512(out + i + 32, _mm512_permutex2var_epi64(a, second, b));
    }
    return i;
}

static int have_vbmi(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vbmi");
    }
    return cached;
}
#endif

static void lut_run(st_dtype src, st_dtype dst, const uint8_t *in, void *out, size_t n, int f16c) {
    uint8_t codes[256];
    union {
        uint8_t b[256];
        uint16_t h[256];
        uint32_t w[256];
    } lut;
    for (int i = 0; i < 256; i++)
        codes[i] = (uint8_t)i;
    cv_run_with(src, dst, codes, &lut, 256, f16c);
    switch (st_dtype_bits(dst)) {
    case 8: {
        uint8_t *o = out;
        for (size_t i = 0; i < n; i++)
            o[i] = lut.b[in[i]];
        break;
    }
    case 16: {
        uint16_t *o = out;
        size_t i = 0;
#ifdef CV_HAVE_F16C_PATH
        if (have_vbmi())
            i = lut16_vbmi(in, o, n, lut.h);
#endif
        for (; i < n; i++)
            o[i] = lut.h[in[i]];
        break;
    }
    default: {
        uint32_t *o = out;
        for (size_t i = 0; i < n; i++)
            o[i] = lut.w[in[i]];
        break;
    }
    }
}

void cv_run_with(st_dtype src, st_dtype dst, const void *in, void *out, size_t n, int f16c) {
    enum { BLOCK = 1024 };
    uint32_t tmp[BLOCK];
    size_t in_size = st_dtype_bits(src) / 8, out_size = st_dtype_bits(dst) / 8;
    const char *ip = in;
    char *op = out;
    if (src == dst) {
        memcpy(out, in, n * in_size);
        return;
    }
    if (in_size == 1 && n >= CV_LUT_MIN) {
        lut_run(src, dst, in, out, n, f16c);
        return;
    }
    if (src == ST_F32) {
        from_f32(dst, in, out, n, f16c, 0xFFFFu);
        return;
    }
    if (dst == ST_F32) {
        to_f32(src, in, out, n, f16c);
        return;
    }
    for (size_t i = 0; i < n; i += BLOCK) {
        size_t k = n - i < BLOCK ? n - i : BLOCK;
        to_f32(src, ip + i * in_size, tmp, k, f16c);
        from_f32(dst, tmp, op + i * out_size, k, f16c, 0x7FC0u);
    }
}

void cv_run(st_dtype src, st_dtype dst, const void *in, void *out, size_t n) {
    cv_run_with(src, dst, in, out, n, have_f16c());
}

/* dtype code of kernels/dtype.h's run-time helpers */
static int rt_code(st_dtype d) {
    switch (d) {
    case ST_F16: return 1;
    case ST_BF16: return 2;
    case ST_F8_E4M3: return 3;
    case ST_F8_E5M2: return 4;
    default: return 0;
    }
}

static uint32_t rt_load(const void *in, size_t i, unsigned bytes) {
    switch (bytes) {
    case 1: return ((const uint8_t *)in)[i];
    case 2: return ((const uint16_t *)in)[i];
    default: return ((const uint32_t *)in)[i];
    }
}

static void rt_store(void *out, size_t i, unsigned bytes, uint32_t v) {
    switch (bytes) {
    case 1: ((uint8_t *)out)[i] = (uint8_t)v; break;
    case 2: ((uint16_t *)out)[i] = (uint16_t)v; break;
    default: ((uint32_t *)out)[i] = v; break;
    }
}

void cv_run_rules(st_dtype src, st_dtype dst, const void *in, void *out, size_t n, int nan, int saturate) {
    int s = rt_code(src), d = rt_code(dst);
    unsigned ib = st_dtype_bits(src) / 8, ob = st_dtype_bits(dst) / 8;
    for (size_t i = 0; i < n; i++)
        rt_store(out, i, ob, ds_convert_any(s, d, rt_load(in, i, ib), nan ? DS_NAN_CUDA : DS_NAN_CPU, saturate));
}
