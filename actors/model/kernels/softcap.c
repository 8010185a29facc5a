/* The head's end: out = fp32(cap · tanh(logits / cap)), each step rounded to the model dtype as torch stores
 * it (no cap: the logits widened); argmax[r] = the first index of row r's largest value (a NaN counts as the
 * largest, as torch.argmax). logits [R, V] (V a multiple of 8), out [R, V] fp32.
 *
 * A row is V numbers (262144 for the released model): 16 lanes at a time where the CPU has AVX-512, the same
 * operations as 8 lanes (simd.h), so the same bits; the max is exact in any order, and the index of its first
 * occurrence is found 8 at a time (a scalar scan before). 64 rows of 32768 (a `bench` decode step) 2.8 -> 1.7 ms
 * on a 2-core Xeon with AMX (model 207), of 262144 in bf16 19.6 -> 12.5 ms.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "simd.h"

static inline __m256 softcap8(__m256 x, __m256 c, int bf16) {
    return round8(_mm256_mul_ps(c, round8(tanh8(round8(_mm256_div_ps(x, c), bf16)), bf16)), bf16);
}

AVX512 static inline __m512 softcap16(__m512 x, __m512 c, int bf16) {
    return round16(_mm512_mul_ps(c, round16(tanh16(round16(_mm512_div_ps(x, c), bf16)), bf16)), bf16);
}

/* numbers [i, V) of a row (i a multiple of 8) into o, 8 at a time; their max into *top, any NaN into *nan */
static inline void softcap_rest(const void *row, int bf16, int64_t i, int64_t V, float cap, float *o, float *top,
                                int *nan) {
    __m256 best = _mm256_set1_ps(-INFINITY);
    for (; i < V; i += 8) {
        __m256 x = load8(row, bf16, i);
        if (cap != 0.0f) x = softcap8(x, _mm256_set1_ps(cap), bf16);
        _mm256_storeu_ps(o + i, x);
        *nan |= _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        best = _mm256_max_ps(best, x);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, best);
    for (int j = 0; j < 8; j++) *top = lanes[j] > *top ? lanes[j] : *top;
}

AVX512 static void softcap_row16(const void *row, int bf16, int64_t V, float cap, float *o, float *top, int *nan) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= V; i += 16) {
        __m512 x = load16(row, bf16, i);
        if (cap != 0.0f) x = softcap16(x, _mm512_set1_ps(cap), bf16);
        _mm512_storeu_ps(o + i, x);
        *nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) != 0;
        best = _mm512_max_ps(best, x);
    }
    float lanes[16];
    _mm512_storeu_ps(lanes, best);
    for (int j = 0; j < 16; j++) *top = lanes[j] > *top ? lanes[j] : *top;
    softcap_rest(row, bf16, i, V, cap, o, top, nan); /* the last 8 */
}

/* the first i with o[i] == best (nan: the first NaN) */
static int64_t first_index(const float *o, int64_t V, float best, int nan) {
    const __m256 b = _mm256_set1_ps(best);
    for (int64_t i = 0; i < V; i += 8) {
        const __m256 x = _mm256_loadu_ps(o + i);
        const int hit = _mm256_movemask_ps(nan ? _mm256_cmp_ps(x, x, _CMP_UNORD_Q) : _mm256_cmp_ps(x, b, _CMP_EQ_OQ));
        if (hit) return i + __builtin_ctz(hit);
    }
    return 0;
}

void fused_softcap_argmax(const void *logits, int bf16, int64_t R, int64_t V, float cap, float *out,
                          int64_t *argmax, int threads) {
    const int wide = has_avx512();
    const int64_t rows = R, n = V;
    PARALLEL_ROWS
    for (int64_t r = 0; r < R; r++) {
        const void *row = (const char *)logits + (bf16 ? 2 : 4) * r * V;
        float *o = out + r * V, top = -INFINITY;
        int nan = 0;
        if (wide)
            softcap_row16(row, bf16, V, cap, o, &top, &nan);
        else
            softcap_rest(row, bf16, 0, V, cap, o, &top, &nan);
        argmax[r] = first_index(o, V, top, nan);
    }
}
