"""Paged KV-cache bookkeeping (pure CPU logic, no tensors): fixed-size blocks, one block table per request and
attention kind, prefix caching by content hash, and sliding windows that give blocks back.

There is one pool per attention kind (sliding, full), since the two kinds have different KV shapes. A block
of a pool holds ``block_size`` consecutive positions of one request for every layer of that kind.

* Full layers keep every block of a request.
* Sliding layers (window W: a query sees itself and W-1 past keys) drop a block as soon as all of its
  positions are older than W-1 tokens before the next query, so a long request holds at most about
  (W - 1 + chunk) / block_size blocks there, however long it grows.
* Prefix caching: a block that is full gets a hash chained over its parent's hash and its token ids; freed
  blocks keep their hash and can be re-hit until they are handed out again (LRU order), as in vLLM and
  nano-vllm. A prefix hit needs the full-layer blocks of the whole prefix and the sliding-layer blocks of its
  last W-1 positions.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence

DROPPED = -1


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks
        self.tokens: list[tuple | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU: oldest first
        self.by_hash: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.hashes[block] is not None:  # evict its cached content
            del self.by_hash[self.hashes[block]]
            self.hashes[block] = self.tokens[block] = None
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None

    def lookup(self, h: int, tokens: tuple) -> int | None:
        block = self.by_hash.get(h)
        return block if block is not None and self.tokens[block] == tokens else None

    def register(self, block: int, h: int, tokens: tuple) -> None:
        if self.hashes[block] is None and h not in self.by_hash:
            self.by_hash[h] = block
            self.hashes[block], self.tokens[block] = h, tokens


@dataclass
class PrefixStats:
    queried_tokens: int = 0
    hit_tokens: int = 0


class BlockManager:
    def __init__(self, block_size: int, num_blocks: dict[str, int], windows: dict[str, int | None],
                 prefix_caching: bool = True):
        self.block_size = block_size
        self.pools = {kind: BlockPool(n) for kind, n in num_blocks.items()}
        self.windows = windows  # kind -> window (None for full attention)
        self.prefix_caching = prefix_caching
        self.stats = PrefixStats()
        self._hashes: dict[str, list[int]] = {}  # request id -> hashes of its full blocks
        self._committed: dict[str, int] = {}  # request id -> blocks already registered

    # ---- capacity -------------------------------------------------------------------------------------
    def max_blocks(self, kind: str, max_len: int, max_chunk: int) -> int:
        """Most blocks of ``kind`` one request can ever hold at once."""
        blocks = -(-max_len // self.block_size)
        w = self.windows[kind]
        return blocks if w is None else min(blocks, -(-(w - 1 + max_chunk) // self.block_size) + 1)

    def fits_ever(self, max_len: int, max_chunk: int) -> str | None:
        """None if a request of ``max_len`` tokens can run alone; otherwise why not."""
        for kind, pool in self.pools.items():
            need = self.max_blocks(kind, max_len, max_chunk)
            if need > pool.num_blocks:
                return (f"needs {need} KV blocks of {self.block_size} tokens on {kind} layers, "
                        f"the cache has {pool.num_blocks}")
        return None

    def usage(self) -> float:
        total = sum(p.num_blocks for p in self.pools.values())
        return sum(p.num_blocks - p.num_free for p in self.pools.values()) / max(total, 1)

    def num_used(self) -> int:
        return sum(p.num_blocks - p.num_free for p in self.pools.values())

    # ---- per request ----------------------------------------------------------------------------------
    def _first_needed(self, kind: str, start: int) -> int:
        """First block a query at position ``start`` (or later) can still see on ``kind`` layers."""
        w = self.windows[kind]
        return 0 if w is None else max(0, start - (w - 1)) // self.block_size

    def _drop_out_of_window(self, seq: Sequence) -> None:
        for kind, table in seq.block_tables.items():
            first = self._first_needed(kind, seq.num_computed)
            # the dropped blocks are always a prefix of the table: walk back from ``first`` only over the ones
            # still held (usually one or none a step), not over the whole history of a long request
            j = first
            while j > 0 and table[j - 1] != DROPPED:
                j -= 1
            for k in range(j, first):  # oldest first: the order they join the free list (LRU)
                self.pools[kind].release(table[k])
                table[k] = DROPPED

    def can_append(self, seq: Sequence, num_new: int) -> bool:
        self._drop_out_of_window(seq)
        end_blocks = -(-(seq.num_computed + num_new) // self.block_size)
        return all(end_blocks - len(seq.block_tables[k]) <= p.num_free for k, p in self.pools.items())

    def append(self, seq: Sequence, num_new: int) -> None:
        """Blocks for positions up to ``num_computed + num_new`` (call after ``can_append``)."""
        end_blocks = -(-(seq.num_computed + num_new) // self.block_size)
        for kind, pool in self.pools.items():
            table = seq.block_tables[kind]
            first_needed = self._first_needed(kind, seq.num_computed)
            for j in range(len(table), end_blocks):
                table.append(pool.allocate() if j >= first_needed else DROPPED)

    def admit(self, seq: Sequence, budget: int) -> int:
        """Admit a waiting request if its cached prefix and its first chunk (at most ``budget`` tokens) fit now:
        new block tables reusing the cached prefix, ``num_computed`` set, blocks for the chunk, the prefix
        counters updated. Returns the chunk's tokens; 0 if it does not fit, and then nothing has changed (no
        counter, no LRU position), as the scheduler asks again every step while memory is short."""
        hashes = self._block_hashes(seq)
        hit = self._longest_hit(seq, hashes) if self.prefix_caching else 0
        bs = self.block_size
        n = min(seq.num_tokens - hit * bs, budget)
        new_blocks = -(-(hit * bs + n) // bs) - hit
        reused = {}
        for kind, pool in self.pools.items():
            first = self._first_needed(kind, hit * bs)
            reused[kind] = [pool.lookup(hashes[j], self._tokens(seq, j)) for j in range(first, hit)]
            leaving_free = sum(pool.refs[block] == 0 for block in reused[kind])  # cached, held by nobody
            if new_blocks + leaving_free > pool.num_free:
                return 0
        for kind, pool in self.pools.items():
            for block in reused[kind]:
                pool.share(block)
            seq.block_tables[kind] = [DROPPED] * (hit - len(reused[kind])) + reused[kind]
        seq.num_computed = seq.num_cached_prefix = hit * bs
        self.stats.queried_tokens += seq.num_tokens
        self.stats.hit_tokens += hit * bs
        self.append(seq, n)
        return n

    def _tokens(self, seq: Sequence, j: int) -> tuple:
        return tuple(seq.token_ids[j * self.block_size : (j + 1) * self.block_size])

    def _block_hashes(self, seq: Sequence) -> list[int]:
        """Hashes of the request's full blocks (recomputed only for blocks added since last time)."""
        hashes = self._hashes.setdefault(seq.request_id, [])
        for j in range(len(hashes), seq.num_tokens // self.block_size):
            hashes.append(hash((hashes[j - 1] if j else None, self._tokens(seq, j))))
        return hashes

    def _longest_hit(self, seq: Sequence, hashes: list[int]) -> int:
        """Cached full blocks to reuse; at least one token is always left to compute (for its logits)."""
        bs = self.block_size
        limit = min(len(hashes), (seq.num_tokens - 1) // bs)
        full_hit = 0
        full = [k for k in self.pools if self.windows[k] is None]
        while full_hit < limit and all(
                self.pools[k].lookup(hashes[full_hit], self._tokens(seq, full_hit)) is not None for k in full):
            full_hit += 1
        for hit in range(full_hit, 0, -1):  # the sliding layers also need the window before the hit point
            if all(self.pools[k].lookup(hashes[j], self._tokens(seq, j)) is not None
                   for k in self.pools if self.windows[k] is not None
                   for j in range(self._first_needed(k, hit * bs), hit)):
                return hit
        return 0

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that became full (their KV is now written) for prefix caching."""
        if not self.prefix_caching:
            return
        hashes = self._block_hashes(seq)
        done = self._committed.get(seq.request_id, 0)
        now = min(len(hashes), seq.num_computed // self.block_size)
        self._committed[seq.request_id] = now
        for j in range(done, now):
            for kind, pool in self.pools.items():
                block = seq.block_tables[kind][j]
                if block != DROPPED:
                    pool.register(block, hashes[j], self._tokens(seq, j))

    def free(self, seq: Sequence) -> None:
        for kind, table in seq.block_tables.items():
            for block in table:
                if block != DROPPED:
                    self.pools[kind].release(block)
        seq.block_tables = {}
        self._hashes.pop(seq.request_id, None)
        self._committed.pop(seq.request_id, None)
