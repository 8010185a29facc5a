/* Grouped GEMM in bf16 on AMX tiles, with fp32 accumulation: for every group g (an expert), y[rows of g] =
 * bf16(x[rows of g] . w[g]^T), w[g] of shape [N, K] as the checkpoint stores it, all groups in one call. An
 * expert with fewer than ``min_rows`` rows goes through the AVX512-BF16 dot kernel instead (bf16_dot.c: at a
 * few rows both are bound by reading the weights, and the dot kernel streams them a little faster), in the
 * same parallel loop, so one call still runs a whole MoE projection with no gather or scatter of rows.
 *
 * Transposed form: a tile multiply C[16 x 16] += A[16 x 32] . B[32 x 16] wants B in pairs of k ("VNNI"
 * order). The weights are the A side, y^T = w . x^T: a tile of A is 16 weight rows x 32 k, loaded straight
 * from the checkpoint's layout (rows K apart), so the weights are never repacked and stay what the dot
 * kernel, torch and the expert moves read. The activations are the B side: each big expert's rows are packed
 * once per call into tiles of 16 rows x 32 k in pair order (a few % of the multiply's bytes), padded with
 * zeros to 16 rows. A work item is up to 256 of one expert's rows times 32 .. 128 weight rows (about 192 KB of
 * weights, in L2). Per step of 32 k it loads 2 weight tiles and 2 activation tiles into 4 accumulator tiles
 * (32 columns x 32 rows of y). The steps go in blocks of KB (256 k): the 32 weight rows' 16 KB of such a block
 * stay in L1 while every 32 rows of x pass over them, the accumulators parked in L1 between blocks (as fp32,
 * so the same sums), and the next block's weights are fetched meanwhile. Against streaming both sides from L2
 * over the whole K, a `bench` prefill chunk's experts went 200 -> 181 ms on a 2-core Xeon with AMX (model 207;
 * docs/performance.md).
 *
 * An expert of at most 16 rows (every expert at decode) has one activation tile a step, and with it 4 tiles
 * free: such items take two sets of operand tiles in turn (tiles are not renamed, so one set would make each
 * step's loads wait for the last step's multiplies), the weights fetched 4 steps ahead into L1, and wider
 * items (about 1.5 MB of weights: longer streams, fewer items). At decode both kernels are bound by reading
 * the weights; a `bench` decode step's two layers of experts (3 GB) went 125-128 -> 112-114 ms on a 2-core
 * Xeon with AMX (model 167; a plain read of the same bytes: 101-105 ms; docs/performance.md).
 *
 * An expert of 17 to 64 rows whose matrix comes from memory (a decode step's projections and head at batch
 * 64) has 2 to 4 activation tiles a step: its items (as wide as those above) load each 16 weight rows' tile
 * once a step and multiply it into every block's accumulator, so the weights are read once, over the whole K
 * (fetched 4 steps ahead), where the 32-row kernel passed over each item's weights twice and parked its
 * accumulators every 256 k. The `bench` head (184 MB) at 64 rows went 11.5-16.2 -> 10.0-10.5 ms, at 32 rows
 * 8.5-9.5 -> 7.8-8.1 ms (3 alternating pairs, cold weights, a 2-core Xeon with AMX, model 167;
 * docs/performance.md). A matrix that stays in cache keeps the 32-row kernel (MID_MIN_BYTES).
 *
 * Each output element is one fixed chain (the tile unit's sums over k = 0 .. K-1, 32 at a time, in order)
 * that reads only its own row of x and column of w: a row's result does not depend on the rows beside it,
 * so the cluster's shards compute exactly what the in-process model does (which kernel an expert takes
 * depends on its row count alone). Rounded to bf16 once, to nearest even.
 *
 * Linux hands out AMX state only on request (arch_prctl ARCH_REQ_XCOMP_PERM): ``bf16_amx_init`` asks for it
 * once; cpu_kernels.py uses this kernel only where that succeeded.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
#define ITEM_BYTES (192 << 10)
/* rows of one expert per work item: their packed tiles (1.4 MB at K = 2816) stay in L2; 128 was 7-13 % slower
 * at 256 rows per expert */
#define CHUNK_ROWS 256
#define KB 8 /* tiles of k per block: 4 and 16 were no faster */
#define NARROW_ITEM_BYTES (1536 << 10) /* weights per item of a narrow expert (<= 16 rows): 768 KB and 3 MB alike */
#define NARROW_AHEAD 4 /* steps of k the narrow items fetch the weights ahead (2 and 8 no faster) */
#define MID_ROWS 64 /* rows of an expert whose items read the weights once (4 accumulator tiles) */
/* ... where its matrix is this large: more than the L2 of two cores, so it comes from memory. A small matrix
 * stays in cache, and there the 32-row kernel's two weight tiles a step were faster (64 rows, a C harness on
 * a 2-core Xeon with AMX, model 167, medians of 2000 calls, 3 alternating pairs: 128 x 256 8.6-12.6 against
 * 15.7-28.4 us, the `bench` router 128 x 2816 73-97 against 88-129 us) */
#define MID_MIN_BYTES (4 << 20)
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

void bf16_dot_item(const uint16_t *x, int64_t ldx, int64_t M, const uint16_t *w, int64_t K, uint16_t *y,
                   int64_t ldy, int64_t n0, int64_t n1); /* bf16_dot.c */

/* 0 when this process may use AMX tiles */
int bf16_amx_init(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

TARGET static void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64;
    _tile_loadconfig(&c);
}

/* rows [0, M) of x (M <= 16) as K / 32 tiles of 16 k-pairs x 16 rows x 2, zero rows past M */
static void pack_rows(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, uint16_t *out) {
    const uint32_t *x32 = (const uint32_t *)x; /* a k-pair as one 32-bit word */
    uint32_t *o = (uint32_t *)out;
    for (int64_t kp = 0; kp < K / 2; kp++)
        for (int64_t m = 0; m < 16; m++) o[kp * 16 + m] = m < M ? x32[m * (ldx / 2) + kp] : 0;
}

/* C (16 n x 16 m, fp32) -> y[m][n] in bf16 for m < M, rounded to nearest even: C transposed in registers */
TARGET static void store_tile(const float *c, int64_t M, uint16_t *y, int64_t ldy) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(c + 16 * i);
    for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
#define PD(v) _mm512_castps_pd(v)
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(PD(t[i]), PD(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(PD(t[i]), PD(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(PD(t[i + 1]), PD(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(PD(t[i + 1]), PD(t[i + 3])));
    }
#undef PD
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0x88);
            t[h + 4 + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
    }
    for (int64_t m = 0; m < M; m++) _mm256_storeu_si256((__m256i *)(y + m * ldy), (__m256i)_mm512_cvtneps_pbh(r[m]));
}

/* columns [n0, n1) (multiples of 16) of one group: M rows of x packed in xp (16-row blocks of K / 32 tiles) */
TARGET static void amx_item(const uint16_t *xp, int64_t M, const uint16_t *w, int64_t K, uint16_t *y,
                            int64_t ldy, int64_t n0, int64_t n1) {
    float acc[CHUNK_ROWS / 32][4][256];
    const int64_t tiles = K / 32, blocks = (M + 15) / 16, pairs = (blocks + 1) / 2, lda = 2 * K;
    for (int64_t n = n0; n < n1; n += 32) {
        const int two_n = n + 32 <= n1;
        const uint16_t *a0 = w + n * K, *a1 = w + (n + 16) * K;
        for (int64_t k0 = 0; k0 < tiles; k0 += KB) {
            const int64_t k1 = k0 + KB < tiles ? k0 + KB : tiles;
            /* the weights of the next k block (or the next 32 columns' first), fetched while these compute */
            const int64_t nn = k1 < tiles ? n : n + 32, nk = k1 < tiles ? k1 : 0;
            const int64_t nrows = nn >= n1 ? 0 : nn + 32 <= n1 ? 32 : 16;
            const uint16_t *next = w + nn * K + 32 * nk;
            for (int64_t b = 0, p = 0; b < blocks; b += 2, p++) {
                const int two_m = b + 1 < blocks;
                const uint16_t *b0 = xp + b * tiles * 512, *b1 = b0 + tiles * 512;
                if (k0 == 0) {
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                } else {
                    _tile_loadd(0, acc[p][0], 64); _tile_loadd(1, acc[p][1], 64);
                    _tile_loadd(2, acc[p][2], 64); _tile_loadd(3, acc[p][3], 64);
                }
                for (int64_t t = k0; t < k1; t++) {
                    if (nk + t - k0 < tiles)
                        for (int64_t r = p; r < nrows; r += pairs)
                            _mm_prefetch((const char *)(next + r * K + 32 * (t - k0)), _MM_HINT_T1);
                    _tile_loadd(4, a0 + 32 * t, lda);
                    _tile_loadd(6, b0 + 512 * t, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    if (two_m) { _tile_loadd(7, b1 + 512 * t, 64); _tile_dpbf16ps(1, 4, 7); }
                    if (two_n) {
                        _tile_loadd(5, a1 + 32 * t, lda);
                        _tile_dpbf16ps(2, 5, 6);
                        if (two_m) _tile_dpbf16ps(3, 5, 7);
                    }
                }
                _tile_stored(0, acc[p][0], 64); _tile_stored(1, acc[p][1], 64);
                _tile_stored(2, acc[p][2], 64); _tile_stored(3, acc[p][3], 64);
                if (k1 < tiles) continue;
                for (int i = 0; i < 2 + 2 * two_n; i++) {
                    const int64_t m = (b + (i & 1)) * 16, left = M - m;
                    if ((i & 1) && !two_m) continue;
                    store_tile(acc[p][i], left < 16 ? left : 16, y + m * ldy + n + (i >> 1) * 16, ldy);
                }
            }
        }
    }
}

/* columns [n0, n1) (multiples of 16) of one group of M <= 16 rows, packed in xp (one block of K / 32 tiles):
 * the same sums as amx_item, each accumulator kept in its tile over the whole K; operand tiles 2, 3, 6 for
 * even steps and 4, 5, 7 for odd ones */
TARGET static void amx_item_narrow(const uint16_t *xp, int64_t M, const uint16_t *w, int64_t K, uint16_t *y,
                                   int64_t ldy, int64_t n0, int64_t n1) {
    float acc[256];
    const int64_t tiles = K / 32, lda = 2 * K;
    for (int64_t n = n0; n < n1; n += 32) {
        const int two_n = n + 32 <= n1;
        const uint16_t *a0 = w + n * K, *a1 = w + (n + 16) * K;
        const int64_t rows = two_n ? 32 : 16;
        _tile_zero(0);
        _tile_zero(1);
#define FETCH(t)                                                                                          \
    if ((t) + NARROW_AHEAD < tiles)                                                                       \
        for (int64_t r = 0; r < rows; r++)                                                                \
            _mm_prefetch((const char *)(a0 + r * K + 32 * ((t) + NARROW_AHEAD)), _MM_HINT_T0);
        int64_t t = 0;
        for (; t + 2 <= tiles; t += 2) {
            FETCH(t) FETCH(t + 1)
            _tile_loadd(2, a0 + 32 * t, lda);
            _tile_loadd(6, xp + 512 * t, 64);
            if (two_n) _tile_loadd(3, a1 + 32 * t, lda);
            _tile_dpbf16ps(0, 2, 6);
            if (two_n) _tile_dpbf16ps(1, 3, 6);
            _tile_loadd(4, a0 + 32 * (t + 1), lda);
            _tile_loadd(7, xp + 512 * (t + 1), 64);
            if (two_n) _tile_loadd(5, a1 + 32 * (t + 1), lda);
            _tile_dpbf16ps(0, 4, 7);
            if (two_n) _tile_dpbf16ps(1, 5, 7);
        }
#undef FETCH
        if (t < tiles) {
            _tile_loadd(2, a0 + 32 * t, lda);
            _tile_loadd(6, xp + 512 * t, 64);
            _tile_dpbf16ps(0, 2, 6);
            if (two_n) {
                _tile_loadd(3, a1 + 32 * t, lda);
                _tile_dpbf16ps(1, 3, 6);
            }
        }
        _tile_stored(0, acc, 64);
        store_tile(acc, M, y + n, ldy);
        if (two_n) {
            _tile_stored(1, acc, 64);
            store_tile(acc, M, y + n + 16, ldy);
        }
    }
}

/* columns [n0, n1) (multiples of 16) of one group of 16 < M <= MID_ROWS rows (blocks = ceil(M / 16) packed
 * blocks in xp): each step loads the tile of 16 weight rows once and multiplies it into every block's
 * accumulator (tiles 0 .. blocks - 1), the activation tiles taking 5, 6, 7 in turn; the same sums as amx_item */
TARGET static void amx_item_mid(const uint16_t *xp, int64_t M, const uint16_t *w, int64_t K, uint16_t *y,
                                int64_t ldy, int64_t n0, int64_t n1) {
    float acc[256];
    const int64_t tiles = K / 32, lda = 2 * K, blocks = (M + 15) / 16, block = tiles * 512;
    for (int64_t n = n0; n < n1; n += 16) {
        const uint16_t *a = w + n * K;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t t = 0; t < tiles; t++) {
            /* this tile's rows NARROW_AHEAD steps on, or the next 16 rows' first steps */
            const int64_t ahead = t + NARROW_AHEAD, next = ahead < tiles ? 0 : n + 16 < n1 ? 16 : -1;
            if (next >= 0)
                for (int64_t r = 0; r < 16; r++)
                    _mm_prefetch((const char *)(a + (next + r) * K + 32 * (ahead - (next ? tiles : 0))), _MM_HINT_T0);
            _tile_loadd(4, a + 32 * t, lda);
            _tile_loadd(5, xp + 512 * t, 64);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, xp + block + 512 * t, 64);
            _tile_dpbf16ps(1, 4, 6);
            if (blocks > 2) { _tile_loadd(7, xp + 2 * block + 512 * t, 64); _tile_dpbf16ps(2, 4, 7); }
            if (blocks > 3) { _tile_loadd(5, xp + 3 * block + 512 * t, 64); _tile_dpbf16ps(3, 4, 5); }
        }
        for (int64_t b = 0; b < blocks; b++) { /* a tile's number must be a constant */
            if (b == 0) _tile_stored(0, acc, 64);
            if (b == 1) _tile_stored(1, acc, 64);
            if (b == 2) _tile_stored(2, acc, 64);
            if (b == 3) _tile_stored(3, acc, 64);
            store_tile(acc, M - 16 * b < 16 ? M - 16 * b : 16, y + 16 * b * ldy + n, ldy);
        }
    }
}

/* whether a group of this many rows takes amx_item_mid */
static int mid_rows(int64_t rows, int64_t N, int64_t K) {
    return rows > 16 && rows <= MID_ROWS && 2 * N * K >= MID_MIN_BYTES;
}

/* rows [row, row + rows) of x, all of one group; block: their first packed 16-row block, -1 for the dot kernel;
 * its work items are [first, first + ceil(N / columns)) */
typedef struct {
    int64_t group, row, rows, block, columns, first;
} chunk;

/* weight rows per work item: about `bytes` of weights, a multiple of 32, at most N */
static int64_t item_columns(int64_t bytes, int64_t N, int64_t K) {
    const int64_t columns = bytes / (2 * K) / 32 * 32;
    return columns < 32 ? 32 : columns > N ? N : columns;
}

/* the chunk that holds work item `it` (chunks in order of their items) */
static const chunk *chunk_of(const chunk *chunks, int64_t count, int64_t it) {
    int64_t lo = 0, hi = count - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (chunks[mid].first <= it) lo = mid; else hi = mid - 1;
    }
    return chunks + lo;
}

/* x [S, K] bf16 (rows ldx apart), w: groups x [N, K] bf16 contiguous (N a multiple of 16, K of 32), y [S, N]
 * bf16 (rows ldy apart). Returns 0, or -1 when out of memory. */
TARGET int bf16_amx_grouped_linear(const uint16_t *x, int64_t ldx, const int64_t *offsets, int64_t groups,
                                   const uint16_t *w, uint16_t *y, int64_t ldy, int64_t N, int64_t K,
                                   int64_t min_rows, int threads) {
    const int64_t tiles = K / 32, S = offsets[groups];
    chunk *chunks = malloc((groups + S / CHUNK_ROWS + 1) * sizeof *chunks);
    if (!chunks) return -1;
    int64_t count = 0, blocks = 0, streamed = 0; /* chunks that take the narrow items' width */
    for (int64_t g = 0; g < groups; g++)
        for (int64_t row = offsets[g], end = offsets[g + 1]; row < end;) {
            const int amx = end - offsets[g] >= min_rows;
            const int64_t rows = !amx ? end - row : end - row < CHUNK_ROWS ? end - row : CHUNK_ROWS;
            chunks[count++] = (chunk){g, row, rows, amx ? blocks : -1, 0, 0};
            blocks += amx ? (rows + 15) / 16 : 0;
            streamed += rows <= 16 || mid_rows(rows, N, K);
            row += rows;
        }
    uint16_t *xp = blocks ? aligned_alloc(64, blocks * tiles * 512 * sizeof *xp) : 0;
    if (blocks && !xp) { free(chunks); return -1; }
    const int64_t wide = item_columns(ITEM_BYTES, N, K);
    int64_t narrow = item_columns(NARROW_ITEM_BYTES, N, K);
    /* narrower where those items would leave a thread idle (a single small matrix) */
    while (narrow > 32 && streamed * ((N + narrow - 1) / narrow) < 4 * threads)
        narrow = narrow >= 128 ? narrow / 2 / 32 * 32 : 32;
    int64_t items = 0;
    for (int64_t c = 0; c < count; c++) {
        const int64_t rows = chunks[c].rows; /* the dot kernel's few rows take the narrow width too */
        chunks[c].columns = rows <= 16 || mid_rows(rows, N, K) ? narrow : wide;
        chunks[c].first = items;
        items += (N + chunks[c].columns - 1) / chunks[c].columns;
    }
    const int parallel = threads > 1 && S * N * K >= (1 << 20);
#pragma omp parallel num_threads(threads) if (parallel)
    {
        if (blocks) configure_tiles();
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < count; c++)
            for (int64_t m = 0; chunks[c].block >= 0 && m < chunks[c].rows; m += 16) {
                const int64_t left = chunks[c].rows - m;
                pack_rows(x + (chunks[c].row + m) * ldx, ldx, left < 16 ? left : 16, K,
                          xp + (chunks[c].block + m / 16) * tiles * 512);
            }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const chunk ch = *chunk_of(chunks, count, it);
            const int64_t n0 = (it - ch.first) * ch.columns, n1 = n0 + ch.columns < N ? n0 + ch.columns : N;
            const uint16_t *wg = w + ch.group * N * K, *xg = xp + ch.block * tiles * 512;
            uint16_t *yg = y + ch.row * ldy;
            if (ch.block < 0)
                bf16_dot_item(x + ch.row * ldx, ldx, ch.rows, wg, K, yg, ldy, n0, n1);
            else if (ch.rows <= 16)
                amx_item_narrow(xg, ch.rows, wg, K, yg, ldy, n0, n1);
            else if (mid_rows(ch.rows, N, K))
                amx_item_mid(xg, ch.rows, wg, K, yg, ldy, n0, n1);
            else
                amx_item(xg, ch.rows, wg, K, yg, ldy, n0, n1);
        }
        if (blocks) _tile_release();
    }
    free(xp);
    free(chunks);
    return 0;
}
