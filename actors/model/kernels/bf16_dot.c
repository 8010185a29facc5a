/* Grouped GEMM in bf16 with fp32 accumulation, on CPUs with AVX512-BF16 (vdpbf16ps): for every group g (an
 * expert), y[rows of g] = bf16(x[rows of g] . w[g]^T) with w[g] of shape [N, K] as the checkpoint stores it;
 * the rows of group g are [offsets[g], offsets[g + 1]). One call runs a whole MoE layer's projection, every
 * expert at once. It is the routed experts' path when the model computes in bf16 on such a CPU
 * (actors/model/precision.py); with AMX, only for experts with few rows (decode), the others going through
 * torch's grouped GEMM on AMX tiles (moe.bf16_cpu_project).
 *
 * Dot-product form: vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 fp32 lanes, so a row of x and a
 * row of w (both contiguous along k) are multiplied 32 k at a time with no repacking of the weights: the
 * weights keep the checkpoint's layout, which torch's grouped GEMM (and so oneDNN, AMX and CUDA) reads too. A
 * micro-kernel keeps MR <= 4 rows x 4 columns of y in 16 registers of 16 lanes, and sums each register's
 * lanes once, at the end; a work item is one expert's rows times the columns of about 192 KB of weights (32
 * columns at K = 2816, 136 at K = 704), which stay in L2 while every row of x passes over them. At decode (a
 * few rows per expert) the weight stream bounds the step: software prefetch keeps it ahead, near into L1 and far
 * into L2.
 *
 * Every output element is one fixed chain (16 lanes over k in order, then a fixed tree over the lanes),
 * whatever M, the row grouping or the thread count: a row's result does not depend on the rows beside it
 * (batch invariance), so the cluster's shards compute exactly what the in-process model does. The fp32 sum is
 * rounded to bf16 once, to nearest even. Compiled with the other kernels (-mavx2): these functions carry their
 * own target, and cpu_kernels.py calls them only on a CPU that has AVX512-BF16.
 */
#include <immintrin.h>
#include <stdint.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define PREFETCH 256 /* weights ahead, in elements (8 cache lines per weight row; 512 was 12% slower on a Xeon) */
/* and far ahead into L2 (16 KB per weight row: past its end, into the rows the next items read; a prefetch never
 * faults): at decode the weight stream went from 19 to 24 GB/s on a 2-core Xeon */
#define AHEAD 8192
#define ITEM_BYTES (192 << 10) /* weights per work item: enough to amortise scheduling, and they stay in L2 */

/* [Σ lanes of a, b, c, d] */
TARGET static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
#define HALF(v) _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    const __m256 ab = _mm256_hadd_ps(HALF(a), HALF(b)), cd = _mm256_hadd_ps(HALF(c), HALF(d));
    const __m256 abcd = _mm256_hadd_ps(ab, cd);
#undef HALF
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

#define DECLARE(i) __m512 a##i##0 = _mm512_setzero_ps(), a##i##1 = a##i##0, a##i##2 = a##i##0, a##i##3 = a##i##0;
#define STEP(i)                                                                                            \
    {                                                                                                      \
        const __m512bh xi = (__m512bh)_mm512_loadu_si512(x + i * ldx + k);                                \
        a##i##0 = _mm512_dpbf16_ps(a##i##0, xi, w0);                                                       \
        a##i##1 = _mm512_dpbf16_ps(a##i##1, xi, w1);                                                       \
        a##i##2 = _mm512_dpbf16_ps(a##i##2, xi, w2);                                                       \
        a##i##3 = _mm512_dpbf16_ps(a##i##3, xi, w3);                                                       \
    }
#define STORE(i) _mm_storel_epi64((__m128i *)(y + i * ldy), (__m128i)_mm_cvtneps_pbh(sum4(a##i##0, a##i##1, a##i##2, a##i##3)));
#define ROWS1(F) F(0)
#define ROWS2(F) ROWS1(F) F(1)
#define ROWS3(F) ROWS2(F) F(2)
#define ROWS4(F) ROWS3(F) F(3)

/* y[MR rows, 4 columns] = x[MR rows, K] . w[4 rows, K]^T; ldx, ldw, ldy in elements. Two of each: kernel_MR
 * prefetches the weights (the first rows over these 4 columns: the weights come from memory), kernel_MR_cached
 * does not (the next rows: the weights are in L1 now, and the prefetches took load slots the dot products
 * need: at 128 rows an expert, 1.15-1.25x faster without them on a 2-core AMD EPYC) */
#define KERNEL(MR, NAME, PREFETCHING)                                                                      \
TARGET static void NAME(const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t ldw, int64_t K,          \
                        uint16_t *y, int64_t ldy) {                                                        \
    ROWS##MR(DECLARE)                                                                                      \
    for (int64_t k = 0; k < K; k += 32) {                                                                  \
        if (PREFETCHING) {                                                                                 \
            _mm_prefetch((const char *)(w + k + PREFETCH), _MM_HINT_T0);                                   \
            _mm_prefetch((const char *)(w + ldw + k + PREFETCH), _MM_HINT_T0);                             \
            _mm_prefetch((const char *)(w + 2 * ldw + k + PREFETCH), _MM_HINT_T0);                         \
            _mm_prefetch((const char *)(w + 3 * ldw + k + PREFETCH), _MM_HINT_T0);                         \
            _mm_prefetch((const char *)(w + k + AHEAD), _MM_HINT_T1);                                      \
            _mm_prefetch((const char *)(w + ldw + k + AHEAD), _MM_HINT_T1);                                \
            _mm_prefetch((const char *)(w + 2 * ldw + k + AHEAD), _MM_HINT_T1);                            \
            _mm_prefetch((const char *)(w + 3 * ldw + k + AHEAD), _MM_HINT_T1);                            \
        }                                                                                                  \
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k);                                           \
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + ldw + k);                                     \
        const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 2 * ldw + k);                                 \
        const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 3 * ldw + k);                                 \
        ROWS##MR(STEP)                                                                                     \
    }                                                                                                      \
    ROWS##MR(STORE)                                                                                        \
}

KERNEL(1, kernel_1, 1) KERNEL(2, kernel_2, 1) KERNEL(3, kernel_3, 1) KERNEL(4, kernel_4, 1)
KERNEL(1, kernel_1_cached, 0) KERNEL(2, kernel_2_cached, 0) KERNEL(3, kernel_3_cached, 0) KERNEL(4, kernel_4_cached, 0)

typedef void (*kernel_fn)(const uint16_t *, int64_t, const uint16_t *, int64_t, int64_t, uint16_t *, int64_t);
static const kernel_fn STREAMING[5] = {0, kernel_1, kernel_2, kernel_3, kernel_4};
static const kernel_fn CACHED[5] = {0, kernel_1_cached, kernel_2_cached, kernel_3_cached, kernel_4_cached};

/* columns [n0, n1) of one group for its M rows (bf16_amx.c calls it too): per 4 columns, every row in groups
 * of at most 4, the first group prefetching the weights */
TARGET void bf16_dot_item(const uint16_t *x, int64_t ldx, int64_t M, const uint16_t *w, int64_t K, uint16_t *y,
                          int64_t ldy, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n += 4)
        for (int64_t m = 0, left = (M + 3) / 4; m < M; left--) {
            const int64_t mr = (M - m + left - 1) / left;
            (m ? CACHED : STREAMING)[mr](x + m * ldx, ldx, w + n * K, K, K, y + m * ldy + n, ldy);
            m += mr;
        }
}

/* x [S, K] bf16 (rows ldx apart), w: groups x [N, K] bf16 contiguous (N a multiple of 4, K of 32), y [S, N]
 * bf16 (rows ldy apart) */
TARGET void bf16_dot_grouped_linear(const uint16_t *x, int64_t ldx, const int64_t *offsets, int64_t groups,
                                    const uint16_t *w, uint16_t *y, int64_t ldy, int64_t N, int64_t K,
                                    int threads) {
    int64_t columns = ITEM_BYTES / (2 * K) / 4 * 4;
    columns = columns < 4 ? 4 : columns > N ? N : columns;
    const int64_t blocks = (N + columns - 1) / columns, items = groups * blocks;
    /* a parallel region costs more than it saves on small problems (and far more on busy cores) */
    const int parallel = threads > 1 && offsets[groups] * N * K >= (1 << 20);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (parallel)
    for (int64_t it = 0; it < items; it++) {
        const int64_t g = it / blocks, b = it % blocks, M = offsets[g + 1] - offsets[g];
        if (M <= 0) continue;
        const int64_t n0 = b * columns, n1 = n0 + columns < N ? n0 + columns : N;
        bf16_dot_item(x + offsets[g] * ldx, ldx, M, w + g * N * K, K, y + offsets[g] * ldy, ldy, n0, n1);
    }
}
