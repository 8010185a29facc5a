/* A front-end's rows for one layer's dispatch (actors/dispatch.py, ``pack_rows``), in one pass instead of a
 * score of small tensor ops. For each shard s, a block of 1 + T rows of row_bytes each: row 0 holds the count
 * (int64), then every token with a slot on s, in token order: its hidden state (n bytes), then its K slots on s
 * as int32 (-1 for another shard's). row_of_slot[t * K + k]: the row of the shards' answers that will hold
 * (t, k)'s output (shards in order, their rows in order, each row's own slots in order).
 */
#include <stdint.h>
#include <string.h>

void moe_dispatch_pack(const char *x, int64_t ldx, int64_t n, const int64_t *shard, const int64_t *slot, int64_t T,
                       int64_t K, int64_t N, char *send, int64_t row_bytes, int64_t *row_of_slot, int64_t *per_shard,
                       int64_t *slots_per_shard) {
    int64_t answer = 0;
    for (int64_t s = 0; s < N; s++) {
        char *block = send + s * (1 + T) * row_bytes;
        int64_t rows = 0, slots = 0;
        for (int64_t t = 0; t < T; t++) {
            const int64_t *shard_t = shard + t * K, *slot_t = slot + t * K;
            int64_t k = 0;
            while (k < K && shard_t[k] != s) k++;
            if (k == K) continue;
            char *row = block + (1 + rows++) * row_bytes;
            memcpy(row, x + t * ldx, n);
            for (k = 0; k < K; k++) {
                const int32_t own = shard_t[k] == s ? (int32_t)slot_t[k] : -1;
                memcpy(row + n + 4 * k, &own, 4);
                if (own >= 0) row_of_slot[t * K + k] = answer++, slots++;
            }
        }
        memcpy(block, &rows, 8);
        per_shard[s] = rows;
        slots_per_shard[s] = slots;
    }
}
