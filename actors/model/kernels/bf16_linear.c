/* y[M, N] = x[M, K] . w[N, K]^T with bf16 weights and fp32 activations, computed in fp32 (AVX2 + FMA).
 *
 * For the few rows per expert of a decode step the expert GEMM is bound by reading the weights: reading them
 * as bf16 (the checkpoint's own dtype, so the fp32 value of every weight is exact) halves the bytes. A bf16
 * number is the top half of an fp32, so widening is a 16-bit shift.
 *
 * Tiles of NB weight rows x MB activation rows keep NB*MB independent FMA chains in flight (one chain is
 * bound by the FMA latency, not by memory). Each output element still has its own chain: 8 lane-wise partial
 * sums over k (k mod 8), then a fixed reduction of the lanes, so a row's result is the same whatever M, the
 * tiling, the row order or the thread count (batch invariance).
 */
#include <immintrin.h>
#include <stdint.h>

static inline __m256 widen(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float widen1(uint16_t b) {
    union { uint32_t u; float f; } v = { (uint32_t)b << 16 };
    return v.f;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* One tile: weight rows [n0, n0 + nb) x activation rows [m0, m0 + mb), nb <= NB, mb <= MB. */
#define TILE(NAME, NB, MB)                                                                              \
static inline void NAME(const float *x, int64_t ldx, const uint16_t *w, float *y, int64_t ldy,          \
                        int64_t n0, int64_t nb, int64_t m0, int64_t mb, int64_t K) {                   \
    __m256 acc[NB][MB];                                                                                 \
    for (int j = 0; j < NB; j++)                                                                        \
        for (int i = 0; i < MB; i++) acc[j][i] = _mm256_setzero_ps();                                   \
    int64_t k = 0;                                                                                      \
    if (nb == NB && mb == MB) {                                                                         \
        for (; k + 8 <= K; k += 8) {                                                                    \
            __m256 xv[MB];                                                                              \
            for (int i = 0; i < MB; i++) xv[i] = _mm256_loadu_ps(x + (m0 + i) * ldx + k);               \
            for (int j = 0; j < NB; j++) {                                                              \
                __m256 wv = widen(w + (n0 + j) * K + k);                                                \
                for (int i = 0; i < MB; i++) acc[j][i] = _mm256_fmadd_ps(xv[i], wv, acc[j][i]);         \
            }                                                                                           \
        }                                                                                               \
    } else {                                                                                            \
        for (; k + 8 <= K; k += 8)                                                                      \
            for (int j = 0; j < nb; j++) {                                                              \
                __m256 wv = widen(w + (n0 + j) * K + k);                                                \
                for (int i = 0; i < mb; i++)                                                            \
                    acc[j][i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (m0 + i) * ldx + k), wv, acc[j][i]); \
            }                                                                                           \
    }                                                                                                   \
    for (int j = 0; j < nb; j++)                                                                        \
        for (int i = 0; i < mb; i++) {                                                                  \
            float s = hsum(acc[j][i]);                                                                  \
            for (int64_t t = k; t < K; t++) s += x[(m0 + i) * ldx + t] * widen1(w[(n0 + j) * K + t]);   \
            y[(m0 + i) * ldy + n0 + j] = s;                                                             \
        }                                                                                               \
}

TILE(tile_8x1, 8, 1)
TILE(tile_4x2, 4, 2)
TILE(tile_2x4, 2, 4)

void bf16_linear(const float *x, int64_t ldx, const uint16_t *w, float *y, int64_t ldy, int64_t M, int64_t N,
                 int64_t K, int threads) {
    /* one row: 8 weight rows at once; 2-3 rows: 4 x 2; more: blocks of 4 rows against 2 weight rows, so each
       widened weight vector feeds 4 FMAs (a last block of 1-3 rows takes the generic path of the tile) */
    const int64_t NB = M == 1 ? 8 : M < 4 ? 4 : 2;
    /* a parallel region costs more than it saves below ~1 MiB of weights (and far more on busy cores) */
    const int parallel = threads > 1 && N * K >= (1 << 19);
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
    for (int64_t n0 = 0; n0 < N; n0 += NB) {
        int64_t nb = N - n0 < NB ? N - n0 : NB;
        if (M == 1)
            tile_8x1(x, ldx, w, y, ldy, n0, nb, 0, 1, K);
        else if (M < 4)
            for (int64_t m0 = 0; m0 < M; m0 += 2)
                tile_4x2(x, ldx, w, y, ldy, n0, nb, m0, M - m0 < 2 ? M - m0 : 2, K);
        else
            for (int64_t m0 = 0; m0 < M; m0 += 4)
                tile_2x4(x, ldx, w, y, ldy, n0, nb, m0, M - m0 < 4 ? M - m0 : 4, K);
    }
}
