/* Decode attention over a paged KV cache, computed in fp32 (AVX2 + FMA): one query token per request, its keys
 * and values read where they lie in the cache's blocks (no gathered copy: at decode that copy cost more than
 * the attention itself). The cache holds fp32 or bf16 numbers (the model's dtype): a bf16 number widens to
 * fp32 exactly (it is the top half of one), so both caches share one algorithm, generated twice below.
 *
 * Request b's query at position pos[b] sees the keys at positions lo[b] .. pos[b] (lo > 0 for a sliding
 * window); position u lives in slot blocks[b][u / bs - lo[b] / bs] * bs + u % bs. The cache of one layer is
 * k, v [.., slots, .., D] with the given strides (in elements) between slots and between KV heads. Query heads
 * h = g * n .. g * n + n - 1 share KV head g (GQA). Per (request, KV head): scores = q . k (attention
 * scaling 1.0, Gemma 4), a softmax in fp32 (max-subtracted exponentials over their sum), out = p . v.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define FLUSH_DENORMALS 0x8040 /* MXCSR: flush-to-zero (results) and denormals-are-zero (inputs) */
#define KEY_GROUP_ARGS k, at, i, count, D, scores, ld
/* keys ahead whose rows are fetched while these compute: they lie in blocks anywhere in the cache, where the
 * hardware's prefetch does not follow (`bench` decode attention in the model 8.7 -> 6.4 ms a step on a 2-core
 * Xeon with AMX, model 207) */
#define AHEAD 16

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* s[0 .. count) <- softmax(s) in fp32, as torch.softmax: exp(s - max) / sum, 8 lanes at a time (a scalar expf
 * per key cost as much as the dot products); the last count % 8 keys through a padded vector; a NaN score
 * makes the row NaN, as torch's */
static void softmax(float *s, int64_t count) {
    const int64_t full = count & ~(int64_t)7, rest = count - full;
    float tail[8];
    for (int j = 0; j < 8; j++) tail[j] = j < rest ? s[full + j] : -INFINITY;
    __m256 top = _mm256_loadu_ps(tail);
    for (int64_t i = 0; i < full; i += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + i));
    top = _mm256_set1_ps(hmax(top));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < full; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), top));
        _mm256_storeu_ps(s + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(tail, exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), top)));
    for (int j = rest; j < 8; j++) tail[j] = 0.0f; /* the padding adds nothing */
    sum = _mm256_set1_ps(hsum(_mm256_add_ps(sum, _mm256_loadu_ps(tail))));
    for (int64_t i = 0; i < full; i += 8) _mm256_storeu_ps(s + i, _mm256_div_ps(_mm256_loadu_ps(s + i), sum));
    for (int j = 0; j < rest; j++) s[full + j] = tail[j] / _mm256_cvtss_f32(sum);
}

/* at[i] = where the key at position lo + i lies (elements from the head's start: its slot times the slot
 * stride), from the block table of logical blocks lo / bs, lo / bs + 1, ...: computed once per request, a
 * block at a time (a division per key, repeated by every head and column range, cost more than the keys) */
static void key_offsets(const int64_t *blocks, int64_t bs, int64_t lo, int64_t count, int64_t slot_stride,
                        int64_t *at) {
    int64_t i = 0, j = 0, off = lo % bs;
    while (i < count) {
        const int64_t base = blocks[j++] * bs;
        for (; off < bs && i < count; off++, i++) at[i] = (base + off) * slot_stride;
        off = 0;
    }
}

/* 8 cache elements as fp32 */
static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load_bf16(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* The kernel for a cache of element type T (read with LOAD; BF16 1 for a bf16 cache): paged_decode_attention_<NAME> */
#define DEFINE_ATTENTION(NAME, T, LOAD, BF16)                                                              \
/* scores[h][i] for `group` keys from i0 at once: n x group independent sums in registers (one key's sum is a  \
 * chain of D / 8 dependent FMAs: alone, its latency, not the loads, set the pace). Inlined with constant n and  \
 * group, so the accumulators stay in registers; each key's sum is the same chain whatever the group. */     \
static inline __attribute__((always_inline)) void key_group_##NAME(const float *q, const int n, const int group,\
        const T *k, const int64_t *at, int64_t i0, int64_t count, int64_t D, float *scores, int64_t ld) {   \
    const T *ku[16];                                                                                       \
    __m256 acc[16];                                                                                        \
    for (int j = 0; j < group; j++) ku[j] = k + at[i0 + j];                                                \
    for (int j = 0; j < group && i0 + AHEAD + j < count; j++)                                              \
        for (int64_t b = 0; b < D * (int64_t)sizeof(T); b += 64)                                           \
            _mm_prefetch((const char *)(k + at[i0 + AHEAD + j]) + b, _MM_HINT_T0);                         \
    for (int a = 0; a < n * group; a++) acc[a] = _mm256_setzero_ps();                                      \
    for (int64_t d = 0; d < D; d += 8)                                                                     \
        for (int j = 0; j < group; j++) {                                                                  \
            const __m256 kv = LOAD(ku[j] + d);                                                             \
            for (int h = 0; h < n; h++)                                                                    \
                acc[j * n + h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * D + d), kv, acc[j * n + h]);      \
        }                                                                                                  \
    for (int j = 0; j < group; j++)                                                                        \
        for (int h = 0; h < n; h++) scores[h * ld + i0 + j] = hsum(acc[j * n + h]);                        \
}                                                                                                          \
                                                                                                           \
/* the keys left after the groups, and other head counts: one key at a time */                            \
static void scores_rest_##NAME(const float *q, int64_t n, const T *k, const int64_t *at, int64_t i,          \
                               int64_t count, int64_t D, float *scores, int64_t ld) {                     \
    for (; i < count; i++)                                                                                 \
        for (int64_t h = 0; h < n; h++) key_group_##NAME(q + h * D, 1, 1, k, at, i, count, D, scores + h * ld, ld); \
}                                                                                                          \
                                                                                                           \
/* scores[h][i] = q_h . k_(lo + i) for n query heads (n <= 8), 8 / n keys at a time */                    \
static void scores_##NAME(const float *q, int64_t n, const T *k, const int64_t *at, int64_t count, int64_t D,\
                          float *scores, int64_t ld) {                                                     \
    int64_t i = 0;                                                                                         \
    switch (n) { /* n heads x group keys: 8 sums in registers */                                            \
    case 1: for (; i + 8 <= count; i += 8) key_group_##NAME(q, 1, 8, KEY_GROUP_ARGS); break;                \
    case 2: for (; i + 4 <= count; i += 4) key_group_##NAME(q, 2, 4, KEY_GROUP_ARGS); break;                \
    case 4: for (; i + 2 <= count; i += 2) key_group_##NAME(q, 4, 2, KEY_GROUP_ARGS); break;                \
    case 8: for (; i < count; i++) key_group_##NAME(q, 8, 1, KEY_GROUP_ARGS); break;                        \
    }                                                                                                      \
    scores_rest_##NAME(q, n, k, at, i, count, D, scores, ld);                                              \
}                                                                                                          \
                                                                                                           \
/* the same sums (the same bits) with twice the keys at a time: AVX-512's 32 vector registers hold 16 */    \
AVX512 static void scores_wide_##NAME(const float *q, int64_t n, const T *k, const int64_t *at, int64_t count,\
                                      int64_t D, float *scores, int64_t ld) {                              \
    int64_t i = 0;                                                                                         \
    switch (n) {                                                                                           \
    case 1: for (; i + 16 <= count; i += 16) key_group_##NAME(q, 1, 16, KEY_GROUP_ARGS); break;            \
    case 2: for (; i + 8 <= count; i += 8) key_group_##NAME(q, 2, 8, KEY_GROUP_ARGS); break;                \
    case 4: for (; i + 4 <= count; i += 4) key_group_##NAME(q, 4, 4, KEY_GROUP_ARGS); break;                \
    case 8: for (; i + 2 <= count; i += 2) key_group_##NAME(q, 8, 2, KEY_GROUP_ARGS); break;                \
    }                                                                                                      \
    scores_rest_##NAME(q, n, k, at, i, count, D, scores, ld);                                              \
}                                                                                                          \
                                                                                                           \
/* out[n, D] = p[n, count] . v (64 columns at a time: 8 accumulators per head). The heads of a column range \
 * one after another, so its values (count x 128 bytes) are read from memory once and from cache by the other \
 * heads: head by head over every column, a 512-wide head's values (1 KB apart) left L2 before the next head. */\
static void values_##NAME(const float *p, int64_t ld, int64_t n, const T *v, const int64_t *at, int64_t count,\
                          int64_t D, float *out) {                                                         \
    for (int64_t d0 = 0; d0 < D; d0 += 64)                                                                 \
        for (int h = 0; h < n; h++) {                                                                      \
            const int64_t w = D - d0 < 64 ? (D - d0) / 8 : 8;                                              \
            __m256 acc[8];                                                                                 \
            for (int j = 0; j < w; j++) acc[j] = _mm256_setzero_ps();                                      \
            for (int64_t i = 0; i < count; i++) {                                                          \
                const T *vu = v + at[i] + d0;                                                              \
                if (h == 0 && i + AHEAD < count)                                                           \
                    for (int64_t b = 0; b < 64 * (int64_t)sizeof(T); b += 64)                              \
                        _mm_prefetch((const char *)(v + at[i + AHEAD] + d0) + b, _MM_HINT_T0);             \
                const __m256 pu = _mm256_set1_ps(p[h * ld + i]);                                           \
                for (int j = 0; j < w; j++) acc[j] = _mm256_fmadd_ps(pu, LOAD(vu + 8 * j), acc[j]);        \
            }                                                                                              \
            for (int j = 0; j < w; j++) _mm256_storeu_ps(out + h * D + d0 + 8 * j, acc[j]);                \
        }                                                                                                  \
}                                                                                                          \
                                                                                                           \
/* values_ in 16 lanes (AVX-512): each output column is the same chain of FMAs over the keys in the same order   \
 * as in 8 lanes, so the same bits with fewer instructions. HN heads x 64 columns at a time: a key's 64 values  \
 * are loaded (and widened) once for the HN heads that share them, not once per head (GQA); HN 4 took the     \
 * full layers' 512-wide heads of `bench` (8 heads a KV head) from 2.5 to 2.1 ms a layer on that Xeon. */      \
AVX512 static inline __attribute__((always_inline)) void values16_block_##NAME(const float *p, int64_t ld,       \
        const int HN, const T *v, const int64_t *at, int64_t count, int64_t d0, int64_t D, float *out) {     \
    __m512 acc[4][4];                                                                                      \
    for (int h = 0; h < HN; h++)                                                                           \
        for (int j = 0; j < 4; j++) acc[h][j] = _mm512_setzero_ps();                                       \
    for (int64_t i = 0; i < count; i++) {                                                                  \
        const T *vu = v + at[i] + d0;                                                                      \
        if (i + AHEAD < count)                                                                             \
            for (int64_t b = 0; b < 64 * (int64_t)sizeof(T); b += 64)                                      \
                _mm_prefetch((const char *)(v + at[i + AHEAD] + d0) + b, _MM_HINT_T0);                     \
        __m512 vv[4];                                                                                      \
        for (int j = 0; j < 4; j++) vv[j] = load16(vu, BF16, 16 * j);                                      \
        for (int h = 0; h < HN; h++) {                                                                     \
            const __m512 pu = _mm512_set1_ps(p[h * ld + i]);                                               \
            for (int j = 0; j < 4; j++) acc[h][j] = _mm512_fmadd_ps(pu, vv[j], acc[h][j]);                 \
        }                                                                                                  \
    }                                                                                                      \
    for (int h = 0; h < HN; h++)                                                                           \
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(out + h * D + d0 + 16 * j, acc[h][j]);                \
}                                                                                                          \
                                                                                                           \
/* D a multiple of 16 */                                                                                   \
AVX512 static void values16_##NAME(const float *p, int64_t ld, int64_t n, const T *v, const int64_t *at,      \
                                   int64_t count, int64_t D, float *out) {                                 \
    int64_t d0 = 0;                                                                                        \
    for (; d0 + 64 <= D; d0 += 64) {                                                                       \
        int64_t h = 0;                                                                                     \
        for (; h + 4 <= n; h += 4) values16_block_##NAME(p + h * ld, ld, 4, v, at, count, d0, D, out + h * D); \
        for (; h + 2 <= n; h += 2) values16_block_##NAME(p + h * ld, ld, 2, v, at, count, d0, D, out + h * D); \
        for (; h < n; h++) values16_block_##NAME(p + h * ld, ld, 1, v, at, count, d0, D, out + h * D);     \
    }                                                                                                      \
    for (int h = 0; d0 < D && h < n; h++) { /* the last D % 64 columns, head by head */                    \
        const int64_t w = (D - d0) / 16;                                                                   \
        __m512 acc[3];                                                                                     \
        for (int j = 0; j < w; j++) acc[j] = _mm512_setzero_ps();                                          \
        for (int64_t i = 0; i < count; i++) {                                                              \
            const T *vu = v + at[i] + d0;                                                                  \
            const __m512 pu = _mm512_set1_ps(p[h * ld + i]);                                               \
            for (int j = 0; j < w; j++) acc[j] = _mm512_fmadd_ps(pu, load16(vu, BF16, 16 * j), acc[j]);   \
        }                                                                                                  \
        for (int j = 0; j < w; j++) _mm512_storeu_ps(out + h * D + d0 + 16 * j, acc[j]);                   \
    }                                                                                                      \
}                                                                                                          \
                                                                                                           \
/* q, out: fp32 [B, G * n, D] contiguous; blocks: [B, max_blocks]; D a multiple of 8. Returns 0, or -1 when \
 * out of memory for the scores. */                                                                        \
int paged_decode_attention_##NAME(const float *q, const T *k, const T *v, int64_t slot_stride,             \
                                  int64_t head_stride, const int64_t *blocks, int64_t max_blocks,          \
                                  const int64_t *pos, const int64_t *lo, int64_t B, int64_t G, int64_t n,   \
                                  int64_t D, int64_t bs, float *out, int threads) {                        \
    int64_t longest = 1, failed = 0;                                                                       \
    for (int64_t b = 0; b < B; b++)                                                                        \
        if (pos[b] - lo[b] + 1 > longest) longest = pos[b] - lo[b] + 1;                                    \
    const int parallel = threads > 1 && B * G > 1, wide = D % 16 == 0 && has_avx512();                    \
    _Pragma("omp parallel num_threads(threads) if (parallel) reduction(| : failed)")                       \
    {                                                                                                      \
        /* denormals as zero: the softmax of a peaked row has probabilities below 1e-38, and every FMA on   \
         * one took a microcode assist (a 512-wide head's decode attention ran 5x slower); such a term is   \
         * below the output's last bit */                                                                  \
        const unsigned int csr = _mm_getcsr();                                                             \
        _mm_setcsr(csr | FLUSH_DENORMALS);                                                                 \
        float *scores = malloc(sizeof(float) * (n < 8 ? n : 8) * longest);                                 \
        int64_t *at = malloc(sizeof(int64_t) * longest);                                                   \
        if (!scores || !at) failed = 1;                                                                    \
        _Pragma("omp for schedule(dynamic, 1)")                                                            \
        for (int64_t item = 0; item < B * G; item++) {                                                     \
            if (!scores || !at) continue;                                                                  \
            const int64_t b = item / G, g = item % G, count = pos[b] - lo[b] + 1;                          \
            key_offsets(blocks + b * max_blocks, bs, lo[b], count, slot_stride, at);                       \
            for (int64_t h0 = 0; h0 < n; h0 += 8) { /* query heads of this KV head, 8 at a time */         \
                const int64_t hn = n - h0 < 8 ? n - h0 : 8;                                                \
                const float *qh = q + (b * G * n + g * n + h0) * D;                                        \
                (wide ? scores_wide_##NAME : scores_##NAME)(qh, hn, k + g * head_stride, at, count, D, scores, \
                                                            longest);                                      \
                for (int h = 0; h < hn; h++) softmax(scores + h * longest, count);                         \
                (wide ? values16_##NAME : values_##NAME)(scores, longest, hn, v + g * head_stride, at, count, \
                                                         D, out + (b * G * n + g * n + h0) * D);           \
            }                                                                                              \
        }                                                                                                  \
        free(scores);                                                                                      \
        free(at);                                                                                          \
        _mm_setcsr(csr);                                                                                   \
    }                                                                                                      \
    return failed ? -1 : 0;                                                                                \
}

DEFINE_ATTENTION(f32, float, load_f32, 0)
DEFINE_ATTENTION(bf16, uint16_t, load_bf16, 1)
