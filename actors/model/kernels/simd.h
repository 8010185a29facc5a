/* 8-lane (AVX2 + FMA) helpers shared by the kernels: a row's numbers in the model dtype (fp32 or bf16) as fp32
 * and back, and e^x and tanh for 8 lanes; then the same for 16 lanes (AVX-512), operation for operation, so a
 * lane's result is the same bits on either width. Included by each kernel that uses them (static inline: one
 * copy per file, no symbols between files). The kernels compile for AVX2: a function using the 16-lane helpers
 * carries AVX512 (a target of its own) and is called only where the CPU has it (``has_avx512``). */
#ifndef EPSERVE_SIMD_H
#define EPSERVE_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

/* rows in parallel once there are enough numbers to pay for a parallel region (a prefill chunk, not a
 * decode step); each row is computed by one thread, alone, so the result does not depend on the count
 * (`rows`, `n` the numbers a row, and `threads` in scope) */
#define PARALLEL_ROWS _Pragma("omp parallel for num_threads(threads) schedule(static) if (rows * n >= (1 << 13))")

/* 8 numbers of a row in the model dtype, as fp32, and back (rounded to nearest even, as torch) */
static inline __m256 load8(const void *p, int bf16, int64_t i) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline __m256 round8(__m256 f, int bf16) { /* the value a tensor of the dtype stores for each lane */
    if (!bf16) return f;
    const __m256i u = _mm256_castps_si256(f), mask = _mm256_set1_epi32((int)0xffff0000u);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb);
    const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(u, bias), mask);
    const __m256i quiet = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x400000)), mask);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    return _mm256_castsi256_ps(_mm256_blendv_epi8(rounded, quiet, nan));
}

static inline void store8(void *p, int bf16, int64_t i, __m256 f) { /* f already rounded to the dtype */
    if (!bf16) {
        _mm256_storeu_ps((float *)p + i, f);
        return;
    }
    const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(f), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), packed);
}

/* e^x for 8 lanes (|x| <= 88; Cephes' expf: Cody-Waite reduction by ln 2, a degree-6 polynomial); NaN stays
 * NaN (min and max give their second operand when one is NaN) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-88.0f), x));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

/* tanh for 8 lanes, within 1.4 ulp of the true value over [-12, 12] (torch's own: 0.6): an odd polynomial below
 * |x| = 0.625 (Cephes' tanhf), 1 - 2 / (e^2|x| + 1) above (+-1 in fp32 from |x| = 9.01); NaN stays NaN */
static inline __m256 tanh8(__m256 x) {
    const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f)), a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
    const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
    const __m256 capped = _mm256_min_ps(a, _mm256_set1_ps(10.0f)), one = _mm256_set1_ps(1.0f);
    const __m256 e = exp8(_mm256_add_ps(capped, capped));
    const __m256 large = _mm256_or_ps(sign, _mm256_sub_ps(one, _mm256_div_ps(_mm256_add_ps(one, one),
                                                                              _mm256_add_ps(e, one))));
    const __m256 y = _mm256_blendv_ps(large, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); /* NaN in, NaN out */
}

/* ---- 16 lanes (AVX-512 F/BW/DQ): the 8-lane helpers' operations, in the same order */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

static inline int has_avx512(void) { /* EPSERVE_AVX512=0: the 8-lane path anyway (tests compare the two) */
    static int known = -1;
    if (known < 0) {
        const char *off = getenv("EPSERVE_AVX512");
        known = !(off && off[0] == '0') && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    }
    return known;
}

AVX512 static inline __m512 load16(const void *p, int bf16, int64_t i) {
    if (!bf16) return _mm512_loadu_ps((const float *)p + i);
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

AVX512 static inline __m512 round16(__m512 f, int bf16) {
    if (!bf16) return f;
    const __m512i u = _mm512_castps_si512(f), mask = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb);
    const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(u, bias), mask);
    const __m512i quiet = _mm512_and_si512(_mm512_or_si512(u, _mm512_set1_epi32(0x400000)), mask);
    return _mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), rounded, quiet));
}

AVX512 static inline void store16(void *p, int bf16, int64_t i, __m512 f) {
    if (!bf16) {
        _mm512_storeu_ps((float *)p + i, f);
        return;
    }
    const __m512i hi = _mm512_srli_epi32(_mm512_castps_si512(f), 16);
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), _mm512_cvtepi32_epi16(hi));
}

AVX512 static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-88.0f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(scale));
}

AVX512 static inline __m512 tanh16(__m512 x) {
    const __m512 sign = _mm512_and_ps(x, _mm512_set1_ps(-0.0f)), a = _mm512_andnot_ps(_mm512_set1_ps(-0.0f), x);
    const __m512 z = _mm512_mul_ps(x, x);
    __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954e-2f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531e-2f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036e-1f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422e-1f));
    const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
    const __m512 capped = _mm512_min_ps(a, _mm512_set1_ps(10.0f)), one = _mm512_set1_ps(1.0f);
    const __m512 e = exp16(_mm512_add_ps(capped, capped));
    const __m512 large = _mm512_or_ps(sign, _mm512_sub_ps(one, _mm512_div_ps(_mm512_add_ps(one, one),
                                                                              _mm512_add_ps(e, one))));
    const __m512 y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.625f), _CMP_LT_OQ), large, small);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x);
}

#endif
