/* The small steps of a decoder layer fused into one call each: RMSNorms with what surrounds them, RoPE, the
 * router's softmax and top-k, and the experts' sort and weighted sum. At decode each of these is a few
 * thousand numbers per token, and as a chain of torch operators it cost more in per-operator overhead than
 * in arithmetic (docs/performance.md, "Decode step, by part"); here each is one pass over its rows.
 *
 * Every function computes what actors/model/ops.py's torch reference computes, in the same order: fp32
 * arithmetic on fp32 or bf16 tensors (bf16 widens exactly), rounded to the tensor's dtype wherever torch
 * stores an intermediate tensor (``st``), so that a bf16 model rounds where transformers' does. Sums of
 * squares are taken in fp32 in a fixed order (8 lanes, then a fixed tree), so a row's result depends on that
 * row alone (batch invariance). Compiled with -ffp-contract=off: a * b + c stays two roundings, as in torch.
 *
 * Tensors are passed as raw pointers with an element type: 0 = fp32, 1 = bf16. Rows are contiguous. Large
 * inputs (a prefill chunk) are split by rows over `threads` threads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define MAX_DIM 16384 /* the widest row these kernels take (scratch on the stack); checked in ops.py */


static inline float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch; NaN stays NaN (a select: vectorizes) */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

/* the value a tensor of type `bf16` stores for f */
static inline float rnd(float f, int bf16) { return bf16 ? from_bf16(to_bf16(f)) : f; }

/* rows of n numbers: 8 lanes at a time, the last n % 8 one by one (the same operations, so the same bits) */
static inline void load_row(const void *p, int bf16, int64_t n, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8(p, bf16, i));
    for (; i < n; i++) out[i] = bf16 ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_row(void *p, int bf16, int64_t n, const float *in) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) store8(p, bf16, i, round8(_mm256_loadu_ps(in + i), bf16));
    for (; i < n; i++) {
        if (bf16)
            ((uint16_t *)p)[i] = to_bf16(in[i]);
        else
            ((float *)p)[i] = in[i];
    }
}

/* out[i] = stored(a[i] + b[i]) (out may be a or b) */
static inline void add_rows(const float *a, const float *b, int64_t n, int bf16, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, round8(_mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)), bf16));
    for (; i < n; i++) out[i] = rnd(a[i] + b[i], bf16);
}

static inline const void *row_of(const void *p, int bf16, int64_t i, int64_t n) {
    return (const char *)p + (bf16 ? 2 : 4) * i * n;
}
static inline void *mrow_of(void *p, int bf16, int64_t i, int64_t n) {
    return (char *)p + (bf16 ? 2 : 4) * i * n;
}

/* (mean(x²) + eps)^-1/2 of one fp32 row: the sum in 8 lanes, then a fixed tree */
static float inverse_rms(const float *x, int64_t n, float eps) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    float s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (; i < n; i++) s += x[i] * x[i];
    return 1.0f / sqrtf(s / (float)n + eps);
}

/* out[i] <- stored(x[i] * inv [* w[i]]) : torch's rms_norm (x̂ · w, cast back); out may be x */
static inline void scale_row(const float *x, int64_t n, float inv, const float *w, int bf16, float *out) {
    const __m256 s = _mm256_set1_ps(inv);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), s);
        _mm256_storeu_ps(out + i, round8(w ? _mm256_mul_ps(v, _mm256_loadu_ps(w + i)) : v, bf16));
    }
    for (; i < n; i++) out[i] = rnd(w ? (x[i] * inv) * w[i] : x[i] * inv, bf16);
}

static inline void normalize(float *x, int64_t n, float inv, const float *w, int bf16) {
    scale_row(x, n, inv, w, bf16, x);
}

/* y = rms_norm(x, w) over rows of n (w may be NULL) */
void fused_rms_norm(const void *x, int bf16, int64_t rows, int64_t n, const float *w, float eps, void *y,
                    int threads) {
    PARALLEL_ROWS
    for (int64_t r = 0; r < rows; r++) {
        float buf[MAX_DIM];
        load_row(row_of(x, bf16, r, n), bf16, n, buf);
        normalize(buf, n, inverse_rms(buf, n, eps), w, bf16);
        store_row(mrow_of(y, bf16, r, n), bf16, n, buf);
    }
}

/* out = residual + rms_norm(x, w) (post-attention) */
void fused_add_rms_norm(const void *residual, const void *x, int bf16, int64_t rows, int64_t n, const float *w,
                        float eps, void *out, int threads) {
    PARALLEL_ROWS
    for (int64_t r = 0; r < rows; r++) {
        float buf[MAX_DIM], res[MAX_DIM];
        load_row(row_of(x, bf16, r, n), bf16, n, buf);
        normalize(buf, n, inverse_rms(buf, n, eps), w, bf16);
        load_row(row_of(residual, bf16, r, n), bf16, n, res);
        add_rows(res, buf, n, bf16, buf);
        store_row(mrow_of(out, bf16, r, n), bf16, n, buf);
    }
}

/* The three inputs of the feed-forward block, from the residual r: the dense MLP's (pre_feedforward_layernorm),
 * the experts' (pre_feedforward_layernorm_2), and the router's (an unweighted norm, times router.scale, times
 * hidden^-1/2, each product stored). */
void fused_ffn_inputs(const void *r, int bf16, int64_t rows, int64_t n, const float *w_dense, const float *w_experts,
                      const float *router_scale, float root, float eps, void *x_dense, void *x_experts,
                      void *x_router, int threads) {
    PARALLEL_ROWS
    for (int64_t t = 0; t < rows; t++) {
        float buf[MAX_DIM], out[MAX_DIM];
        load_row(row_of(r, bf16, t, n), bf16, n, buf);
        const float inv = inverse_rms(buf, n, eps);
        scale_row(buf, n, inv, w_dense, bf16, out);
        store_row(mrow_of(x_dense, bf16, t, n), bf16, n, out);
        scale_row(buf, n, inv, w_experts, bf16, out);
        store_row(mrow_of(x_experts, bf16, t, n), bf16, n, out);
        scale_row(buf, n, inv, NULL, bf16, out); /* x̂, x̂ · scale, then · root: each product stored (× 1 is exact) */
        scale_row(out, n, 1.0f, router_scale, bf16, out);
        scale_row(out, n, root, NULL, bf16, out);
        store_row(mrow_of(x_router, bf16, t, n), bf16, n, out);
    }
}

/* The end of a layer: h = (r + norm(norm(m)·w1 + norm(stored(y))·w2)·w_post) · layer_scalar, with m the dense
 * MLP's output and y the experts' fp32 sum. */
void fused_ffn_output(const void *r, const void *m, const float *y, int bf16, int64_t rows, int64_t n,
                      const float *w1, const float *w2, const float *w_post, float layer_scalar, float eps, void *h,
                      int threads) {
    PARALLEL_ROWS
    for (int64_t t = 0; t < rows; t++) {
        float a[MAX_DIM], b[MAX_DIM];
        load_row(row_of(m, bf16, t, n), bf16, n, a);
        normalize(a, n, inverse_rms(a, n, eps), w1, bf16);
        scale_row(y + t * n, n, 1.0f, NULL, bf16, b); /* y as stored in the dtype */
        normalize(b, n, inverse_rms(b, n, eps), w2, bf16);
        add_rows(a, b, n, bf16, a);
        normalize(a, n, inverse_rms(a, n, eps), w_post, bf16);
        load_row(row_of(r, bf16, t, n), bf16, n, b);
        add_rows(b, a, n, bf16, a);
        scale_row(a, n, layer_scalar, NULL, bf16, a);
        store_row(mrow_of(h, bf16, t, n), bf16, n, a);
    }
}

/* rotate-half RoPE of one head vector in place: x·cos + rotate_half(x)·sin, each product stored; the pairs
 * (i, i + d/2) in one pass, the dtype a constant in each copy of the loop, so that both vectorize */
static inline __attribute__((always_inline)) void rope_pairs(float *restrict x, int64_t half, const float *restrict cos,
                                                             const float *restrict sin, const int bf16) {
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = rnd(rnd(a * cos[i], bf16) + rnd(-b * sin[i], bf16), bf16);
        x[i + half] = rnd(rnd(b * cos[i + half], bf16) + rnd(a * sin[i + half], bf16), bf16);
    }
}

static void rope(float *x, int64_t d, const float *cos, const float *sin, int bf16) {
    if (bf16)
        rope_pairs(x, d / 2, cos, sin, 1);
    else
        rope_pairs(x, d / 2, cos, sin, 0);
}

/* q, k, v of the step's tokens from the raw projections: q = rope(q_norm(q)), k = rope(k_norm(k)),
 * v = norm(v) (unweighted); v_raw may be k_raw (k_eq_v). q_raw [T, nq, d], k_raw / v_raw [T, nk, d], each
 * token's heads one run, tokens ldq / ldk / ldv elements apart (the column blocks of one joint projection,
 * or tensors of their own); q, k, v written contiguous; cos / sin [T, d] in the model dtype. */
void fused_qkv(const void *q_raw, const void *k_raw, const void *v_raw, int64_t ldq, int64_t ldk, int64_t ldv,
               int bf16, int64_t T, int64_t nq, int64_t nk, int64_t d, const float *wq, const float *wk,
               const void *cos, const void *sin, float eps, void *q, void *k, void *v, int threads) {
    const int64_t rows = T, n = (nq + 2 * nk) * d;
    PARALLEL_ROWS
    for (int64_t t = 0; t < T; t++) {
        float buf[MAX_DIM], c[MAX_DIM], s[MAX_DIM];
        load_row(row_of(cos, bf16, t, d), bf16, d, c);
        load_row(row_of(sin, bf16, t, d), bf16, d, s);
        for (int64_t h = 0; h < nq; h++) {
            load_row(row_of(q_raw, bf16, 1, t * ldq + h * d), bf16, d, buf);
            normalize(buf, d, inverse_rms(buf, d, eps), wq, bf16);
            rope(buf, d, c, s, bf16);
            store_row(mrow_of(q, bf16, t * nq + h, d), bf16, d, buf);
        }
        for (int64_t h = 0; h < nk; h++) {
            load_row(row_of(v_raw, bf16, 1, t * ldv + h * d), bf16, d, buf);
            normalize(buf, d, inverse_rms(buf, d, eps), NULL, bf16);
            store_row(mrow_of(v, bf16, t * nk + h, d), bf16, d, buf);
            load_row(row_of(k_raw, bf16, 1, t * ldk + h * d), bf16, d, buf);
            normalize(buf, d, inverse_rms(buf, d, eps), wk, bf16);
            rope(buf, d, c, s, bf16);
            store_row(mrow_of(k, bf16, t * nk + h, d), bf16, d, buf);
        }
    }
}

/* The router's choice from its logits [T, E] (model dtype): softmax in fp32, the top-k probabilities in
 * descending order (ties: the lower expert first), renormalised over the k, times per_expert_scale.
 * weights [T, k] fp32, ids [T, k] int64. */
void fused_route(const void *logits, int bf16, int64_t T, int64_t E, int64_t k, const float *per_expert_scale,
                 float *weights, int64_t *ids, int threads) {
    const int64_t rows = T, n = E * k;
    PARALLEL_ROWS
    for (int64_t t = 0; t < T; t++) {
        float p[MAX_DIM];
        load_row(row_of(logits, bf16, t, E), bf16, E, p);
        float top = p[0], sum = 0.0f;
        for (int64_t e = 1; e < E; e++) top = p[e] > top ? p[e] : top;
        for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(p[e] - top));
        for (int64_t e = 0; e < E; e++) p[e] /= sum;
        float *w = weights + t * k, chosen = 0.0f;
        int64_t *id = ids + t * k;
        for (int64_t j = 0; j < k; j++) { /* k passes of a max: k is 8 at most in practice */
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                if (p[e] < 0.0f) continue; /* taken */
                if (best < 0 || p[e] > p[best]) best = e;
            }
            id[j] = best;
            w[j] = p[best];
            p[best] = -1.0f;
        }
        for (int64_t j = 0; j < k; j++) chosen += w[j];
        for (int64_t j = 0; j < k; j++) w[j] = (w[j] / chosen) * per_expert_scale[id[j]];
    }
}

/* The experts' rows in expert order: for the (token, slot) pairs with a local expert id (>= 0; -1 = another
 * process's), a stable counting sort by expert. offsets [E + 1]; row_of_slot [T * k]: the slot's row, or S
 * for the others' slots; xs [S, n] the tokens' rows gathered (a prefill chunk's are tens of MB: copied by
 * every thread). Returns S. */
int64_t fused_moe_align(const int64_t *ids, int64_t T, int64_t k, int64_t E, const void *x, int bf16, int64_t n,
                        int64_t *offsets, int64_t *row_of_slot, void *xs, int threads) {
    const int64_t size = bf16 ? 2 : 4;
    memset(offsets, 0, sizeof(int64_t) * (E + 1));
    for (int64_t i = 0; i < T * k; i++)
        if (ids[i] >= 0) offsets[ids[i] + 1]++;
    for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    const int64_t S = offsets[E];
    for (int64_t e = E; e > 0; e--) offsets[e] = offsets[e - 1]; /* cursors, shifted: offsets[e+1] = start of e */
    for (int64_t i = 0; i < T * k; i++) {
        if (ids[i] < 0) {
            row_of_slot[i] = S;
            continue;
        }
        row_of_slot[i] = offsets[ids[i] + 1]++;
    }
    offsets[0] = 0;
    const int64_t rows = T * k;
    PARALLEL_ROWS
    for (int64_t i = 0; i < T * k; i++)
        if (row_of_slot[i] < S)
            memcpy((char *)xs + row_of_slot[i] * n * size, (const char *)x + (i / k) * n * size, n * size);
    return S;
}

/* out[t] = Σ_j weights[t, j] · ys[row_of_slot[t·k + j]] in fp32, j in top-k order; rows S (others' slots) add
 * nothing. ys [S, n] in the model dtype, out [T, n] fp32. */
void fused_moe_combine(const void *ys, int bf16, int64_t S, const float *weights, const int64_t *row_of_slot,
                       int64_t T, int64_t k, int64_t n, float *out, int threads) {
    const int64_t rows = T;
    PARALLEL_ROWS
    for (int64_t t = 0; t < T; t++) {
        float row[MAX_DIM];
        float *o = out + t * n;
        for (int64_t i = 0; i < n; i++) o[i] = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            const int64_t r = row_of_slot[t * k + j];
            const float w = weights[t * k + j];
            if (r >= S) continue; /* another process's expert */
            load_row(row_of(ys, bf16, r, n), bf16, n, row);
            for (int64_t i = 0; i < n; i++) o[i] += w * row[i];
        }
    }
}

/* ---------------------------------------------------------------------------------- GELU */

/* GeGLU's activation: out[s] = gelu_tanh(gate[s]) * up[s] for rows s of gate and up (ld elements apart: the
 * halves of one [S, 2I] tensor, or two [S, I] ones); out [S, I]. As torch: GELU in fp32 rounded to the dtype,
 * the product rounded again. I a multiple of 8. */
static inline __attribute__((always_inline)) void gelu_mul_row(const void *g_row, const void *u_row, void *o,
                                                               int64_t I, const int bf16) {
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256 beta = _mm256_set1_ps((float)(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa = _mm256_set1_ps(0.044715f);
    for (int64_t i = 0; i < I; i += 8) {
        const __m256 x = load8(g_row, bf16, i), u = load8(u_row, bf16, i);
        const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
        const __m256 inner = _mm256_mul_ps(beta, _mm256_add_ps(x, _mm256_mul_ps(kappa, cube)));
        const __m256 g = round8(_mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, tanh8(inner))), bf16);
        store8(o, bf16, i, round8(_mm256_mul_ps(g, u), bf16));
    }
}

/* the same on 16 lanes (same bits: simd.h), a last 8 on 8; about half the time where the CPU has AVX-512 */
AVX512 static inline __attribute__((always_inline)) void gelu_mul_row16(const void *g_row, const void *u_row,
                                                                        void *o, int64_t I, const int bf16) {
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    const __m512 beta = _mm512_set1_ps((float)(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa = _mm512_set1_ps(0.044715f);
    int64_t i = 0;
    for (; i + 16 <= I; i += 16) {
        const __m512 x = load16(g_row, bf16, i), u = load16(u_row, bf16, i);
        const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        const __m512 inner = _mm512_mul_ps(beta, _mm512_add_ps(x, _mm512_mul_ps(kappa, cube)));
        const __m512 g = round16(_mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, tanh16(inner))), bf16);
        store16(o, bf16, i, round16(_mm512_mul_ps(g, u), bf16));
    }
    if (i < I) {
        const size_t at = (size_t)i * (bf16 ? 2 : 4);
        gelu_mul_row((const char *)g_row + at, (const char *)u_row + at, (char *)o + at, I - i, bf16);
    }
}

/* every row of fused_gelu_mul through ROW (rows on both threads from 8k numbers), the dtype a constant in each
 * copy of the row loop */
#define GELU_MUL_ROWS(ROW)                                                                                    \
    const int64_t rows = S, n = 2 * I;                                                                        \
    PARALLEL_ROWS                                                                                             \
    for (int64_t s = 0; s < S; s++) {                                                                         \
        const void *g_row = row_of(gate, bf16, s, ld), *u_row = row_of(up, bf16, s, ld);                      \
        if (bf16)                                                                                             \
            ROW(g_row, u_row, mrow_of(out, bf16, s, I), I, 1);                                                \
        else                                                                                                  \
            ROW(g_row, u_row, mrow_of(out, bf16, s, I), I, 0);                                                \
    }

AVX512 static void gelu_mul_avx512(const void *gate, const void *up, int64_t ld, int bf16, int64_t S, int64_t I,
                                   void *out, int threads) {
    GELU_MUL_ROWS(gelu_mul_row16)
}

void fused_gelu_mul(const void *gate, const void *up, int64_t ld, int bf16, int64_t S, int64_t I, void *out,
                    int threads) {
    if (has_avx512()) {
        gelu_mul_avx512(gate, up, ld, bf16, S, I, out, threads);
        return;
    }
    GELU_MUL_ROWS(gelu_mul_row)
}
