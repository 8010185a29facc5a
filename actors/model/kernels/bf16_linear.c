/* Grouped GEMM with bf16 weights and fp32 activations, computed in fp32 (AVX2 + FMA, and AVX-512 where the CPU
 * has it): for every group g (an expert), y[rows of g] = x[rows of g] . w[g]^T with w[g] of shape [N, K]; the
 * rows of group g are [offsets[g], offsets[g + 1]). One call runs a whole MoE layer's projection, every expert
 * at once.
 *
 * Why bf16: a decode step's expert GEMMs have few rows per expert and are bound by reading the weights;
 * reading them as bf16 (the checkpoint's own dtype, so every weight's fp32 value is exact) halves the bytes.
 *
 * The weights are packed once, at load time (cpu_kernels.pack_panels), into panels of 16 output columns:
 * panel p of a matrix holds, for k = 0 .. K-1, the 16 weights w[16p .. 16p+15][k] as 8 32-bit words whose
 * low halves are columns 16p .. 16p+7 and high halves columns 16p+8 .. 16p+15. So one 32-byte load gives 16 weights, and a shift
 * and a mask widen them into two vectors of 8 fp32 columns (a bf16 number is the top half of an fp32).
 * A micro-kernel keeps MR <= 6 rows x 16 columns of y in 12 registers and, per k, broadcasts x[m][k] into 2
 * FMAs per row: no horizontal sums, no copy of x, and software prefetch keeps the weight stream ahead of the
 * arithmetic (the hardware prefetcher alone lags behind the jumps from panel to panel: 2x slower at 4 rows).
 * Measured on the bench preset's shapes with 2 threads: 54 GFLOPS for a decode step's layer (~4 rows per
 * expert, reading 14 GB/s of weights) and 68 GFLOPS for a 2048-token prefill chunk's (docs/performance.md).
 *
 * Work items are (group, 3 panels); a panel is re-read from L2 for every 6 rows. Every output element is
 * one FMA chain over k = 0 .. K-1 in order, whatever M, the row grouping or the thread count: a row's result
 * does not depend on the rows beside it (batch invariance).
 *
 * On a CPU with AVX-512 (``wide``), a second micro-kernel takes two panels at once: their two 32-byte rows
 * at k fill one 512-bit register, so each broadcast feeds two 16-wide FMAs for 32 columns, and it keeps up
 * to 8 rows (16 accumulators of the 32 registers). Each output element is still the same FMA chain over k in
 * order, so both kernels give the same bits; work items are then (group, 4 panels), and an odd last panel
 * goes through the AVX2 kernel. On the bench preset's expert shapes, 2 threads of a Xeon with AVX-512:
 * 157 -> 277 GFLOP/s at 128 rows per expert (a prefill chunk), 92 -> 105 at 4 (a decode step, which reads
 * the weights at 26 GB/s); 12 rows a block gained nothing more.
 */
#include <immintrin.h>
#include <stdint.h>

#define PREFETCH 2048 /* weights ahead, in elements (128 steps of k): measured best of 1024..8192 */
#define PANELS 3      /* panels per work item */
#define PANELS_WIDE 2 /* panel pairs per work item of the AVX-512 kernel */

#define DECLARE(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
#define STEP(i)                                                                                            \
    {                                                                                                      \
        const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);                                             \
        c##i##0 = _mm256_fmadd_ps(a, lo, c##i##0);                                                         \
        c##i##1 = _mm256_fmadd_ps(a, hi, c##i##1);                                                         \
    }
#define STORE(i) _mm256_storeu_ps(y + i * ldy, c##i##0); _mm256_storeu_ps(y + i * ldy + 8, c##i##1);
#define ROWS1(F) F(0)
#define ROWS2(F) ROWS1(F) F(1)
#define ROWS3(F) ROWS2(F) F(2)
#define ROWS4(F) ROWS3(F) F(3)
#define ROWS5(F) ROWS4(F) F(4)
#define ROWS6(F) ROWS5(F) F(5)
#define ROWS7(F) ROWS6(F) F(6)
#define ROWS8(F) ROWS7(F) F(7)

/* y[MR rows, 16 columns] = x[MR rows, K] . panel (the accumulators are named variables: with an array the
 * compiler kept them in memory) */
#define KERNEL(MR)                                                                                         \
static void kernel_##MR(const float *x, int64_t ldx, const uint16_t *panel, int64_t K, float *y,           \
                        int64_t ldy) {                                                                     \
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000);                                               \
    ROWS##MR(DECLARE)                                                                                      \
    for (int64_t k = 0; k < K; k++) {                                                                      \
        _mm_prefetch((const char *)(panel + k * 16 + PREFETCH), _MM_HINT_T0);                              \
        const __m256i w = _mm256_loadu_si256((const __m256i *)(panel + k * 16));                           \
        const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));                                   \
        const __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(w, high));                                  \
        ROWS##MR(STEP)                                                                                     \
    }                                                                                                      \
    ROWS##MR(STORE)                                                                                        \
}

KERNEL(1) KERNEL(2) KERNEL(3) KERNEL(4) KERNEL(5) KERNEL(6)

/* The AVX-512 kernel: y[MR rows, 32 columns] = x[MR rows, K] . (panel, the panel after it). Lanes 0-7 of
 * lo / hi come from the first panel, lanes 8-15 from the second; the stores put the columns back in order. */
#define TARGET512 __attribute__((target("avx512f")))
#define DECLARE_W(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
#define STEP_W(i)                                                                                          \
    {                                                                                                      \
        const __m512 a = _mm512_set1_ps(x[i * ldx + k]);                                                   \
        c##i##0 = _mm512_fmadd_ps(a, lo, c##i##0);                                                         \
        c##i##1 = _mm512_fmadd_ps(a, hi, c##i##1);                                                         \
    }
#define STORE_W(i)                                                                                         \
    _mm512_storeu_ps(y + i * ldy, _mm512_shuffle_f32x4(c##i##0, c##i##1, 0x44));                           \
    _mm512_storeu_ps(y + i * ldy + 16, _mm512_shuffle_f32x4(c##i##0, c##i##1, 0xEE));

#define KERNEL_W(MR)                                                                                       \
TARGET512 static void kernel_w##MR(const float *x, int64_t ldx, const uint16_t *panel, int64_t K, float *y, \
                                   int64_t ldy) {                                                          \
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000);                                               \
    const uint16_t *next = panel + K * 16;                                                                 \
    ROWS##MR(DECLARE_W)                                                                                    \
    for (int64_t k = 0; k < K; k++) {                                                                      \
        _mm_prefetch((const char *)(panel + k * 16 + PREFETCH), _MM_HINT_T0);                              \
        _mm_prefetch((const char *)(next + k * 16 + PREFETCH), _MM_HINT_T0);                               \
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(panel + k * 16));                          \
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(next + k * 16));                           \
        const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);                           \
        const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));                                   \
        const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(w, high));                                  \
        ROWS##MR(STEP_W)                                                                                   \
    }                                                                                                      \
    ROWS##MR(STORE_W)                                                                                      \
}

KERNEL_W(1) KERNEL_W(2) KERNEL_W(3) KERNEL_W(4) KERNEL_W(5) KERNEL_W(6) KERNEL_W(7) KERNEL_W(8)

typedef void (*kernel_fn)(const float *, int64_t, const uint16_t *, int64_t, float *, int64_t);
static const kernel_fn KERNELS[7] = {0, kernel_1, kernel_2, kernel_3, kernel_4, kernel_5, kernel_6};
static const kernel_fn WIDE[9] = {0, kernel_w1, kernel_w2, kernel_w3, kernel_w4, kernel_w5, kernel_w6, kernel_w7,
                                   kernel_w8};

/* panels [p0, p1) of one group for its M rows, ``step`` panels a call, in blocks of at most ``most`` rows of
 * near-equal size (7 = 4 + 3 with 6) */
static void sweep(const kernel_fn *kernels, int64_t most, int64_t step, const float *x, int64_t ldx, int64_t M,
                  const uint16_t *w, int64_t K, float *y, int64_t ldy, int64_t p0, int64_t p1) {
    for (int64_t m = 0, left = (M + most - 1) / most; m < M; left--) {
        const int64_t mr = (M - m + left - 1) / left;
        for (int64_t p = p0; p < p1; p += step)
            kernels[mr](x + m * ldx, ldx, w + p * K * 16, K, y + m * ldy + 16 * p, ldy);
        m += mr;
    }
}

static void item(const float *x, int64_t ldx, int64_t M, const uint16_t *w, int64_t K, float *y, int64_t ldy,
                 int64_t p0, int64_t p1, int wide) {
    const int64_t pairs_end = wide ? p0 + (p1 - p0) / 2 * 2 : p0;
    if (pairs_end > p0) sweep(WIDE, 8, 2, x, ldx, M, w, K, y, ldy, p0, pairs_end);
    if (p1 > pairs_end) sweep(KERNELS, 6, 1, x, ldx, M, w, K, y, ldy, pairs_end, p1);
}

/* w: groups x packed [N, K] matrices (N a multiple of 16); wide: take the AVX-512 kernel where the CPU has it */
void bf16_grouped_linear(const float *x, int64_t ldx, const int64_t *offsets, int64_t groups, const uint16_t *w,
                         float *y, int64_t ldy, int64_t N, int64_t K, int wide, int threads) {
    wide = wide && __builtin_cpu_supports("avx512f");
    const int64_t panels = wide ? 2 * PANELS_WIDE : PANELS;
    const int64_t blocks = (N / 16 + panels - 1) / panels, items = groups * blocks;
    /* a parallel region costs more than it saves on small problems (and far more on busy cores) */
    const int parallel = threads > 1 && offsets[groups] * N * K >= (1 << 20);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (parallel)
    for (int64_t it = 0; it < items; it++) {
        const int64_t g = it / blocks, b = it % blocks, M = offsets[g + 1] - offsets[g];
        if (M <= 0) continue;
        const int64_t p0 = b * panels, p1 = p0 + panels < N / 16 ? p0 + panels : N / 16;
        item(x + offsets[g] * ldx, ldx, M, w + g * N * K, K, y + offsets[g] * ldy, ldy, p0, p1, wide);
    }
}
