"""The engine's bookkeeping per decode step at long context, without the model: 64 decoding requests (the
released model's windows: 1024 tokens on sliding layers, the whole context on full ones), each step
scheduled (``BlockManager.can_append`` + ``append`` per request, a block dropped from the sliding window's
edge now and then) and planned (``kv_cache.table_arrays`` + ``plan_step``: the slots to write, the blocks
each request's keys lie in).

    python benchmarks/step_overhead.py [--requests 64] [--contexts 144,4096,32768,131072] [--steps 32] [--no-write]

Records docs/performance.md ("Step bookkeeping at long context"). Every figure is the best of 3 rounds.
"""

from __future__ import annotations

import argparse
import time

from common import git_revision, machine, write_section

from epserve.actors.engine.block_manager import BlockManager
from epserve.actors.engine.kv_cache import plan_step, table_arrays
from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.engine.sequence import Sequence
from epserve.actors.model.config import FULL, SLIDING

BLOCK, WINDOW, CHUNK = 16, 1024, 2048
WINDOWS = {SLIDING: WINDOW, FULL: None}


def requests_at(context: int, n: int) -> tuple[BlockManager, list[Sequence]]:
    """n requests whose first ``context`` tokens are in the cache (admitted, then grown chunk by chunk)."""
    per_full = -(-(context + 4096) // BLOCK)
    blocks = BlockManager(BLOCK, {SLIDING: n * ((WINDOW + CHUNK) // BLOCK + 4), FULL: n * per_full}, WINDOWS,
                          prefix_caching=False)
    seqs = []
    for i in range(n):
        seq = Sequence(str(i), [5] * context, SamplingParams(max_tokens=1 << 20), frozenset())
        seq.num_computed = 0
        done = blocks.admit(seq, min(CHUNK, context))
        seq.num_computed += done
        while seq.num_computed < context:
            k = min(CHUNK, context - seq.num_computed)
            assert blocks.can_append(seq, k)
            blocks.append(seq, k)
            seq.num_computed += k
        seqs.append(seq)
    return blocks, seqs


def timed_steps(blocks: BlockManager, seqs: list[Sequence], steps: int) -> tuple[float, float]:
    """(scheduling, planning) seconds per decode step, each the best of 3 rounds of ``steps`` steps."""
    best = [float("inf"), float("inf")]
    for _ in range(3):
        spent = [0.0, 0.0]
        for _ in range(steps):
            t0 = time.perf_counter()
            for seq in seqs:
                seq.token_ids.append(7)
                assert blocks.can_append(seq, 1)
                blocks.append(seq, 1)
            t1 = time.perf_counter()
            plan_step([s.num_computed for s in seqs], [1] * len(seqs), [table_arrays(s) for s in seqs], WINDOWS,
                      BLOCK, "cpu")
            t2 = time.perf_counter()
            for seq in seqs:
                seq.num_computed += 1
            spent[0], spent[1] = spent[0] + t1 - t0, spent[1] + t2 - t1
        best = [min(b, s / steps) for b, s in zip(best, spent)]
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--contexts", default="144,4096,32768,131072")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = ["| context (tokens) | scheduling (ms a step) | step plan (ms a step) |", "|---|---|---|"]
    for context in (int(c) for c in args.contexts.split(",")):
        blocks, seqs = requests_at(context, args.requests)
        schedule, plan = timed_steps(blocks, seqs, args.steps)
        rows.append(f"| {context} | {1000 * schedule:.2f} | {1000 * plan:.2f} |")
        print(rows[-1], flush=True)
    body = f"""
Command: `python benchmarks/step_overhead.py --requests {args.requests} --contexts {args.contexts} --steps {args.steps}`
(revision {git_revision()}; {machine()}).
{args.requests} decoding requests, blocks of {BLOCK} tokens, a {WINDOW}-token sliding window and full attention:
the scheduler's block bookkeeping and the step plan per decode step, without the model (best of 3 rounds).

""" + "\n".join(rows)
    print(body)
    if not args.no_write:
        write_section("Step bookkeeping at long context", body)


if __name__ == "__main__":
    main()
