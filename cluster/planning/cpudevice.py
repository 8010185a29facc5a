"""This machine's costs, from a calibration (calibrate.py): the ranks are processes sharing ``cores`` cores,
each computing with one thread (a Ray actor's default: Ray sets OMP_NUM_THREADS=1 for actors that ask for
less than a CPU, as the cluster's do)."""

from __future__ import annotations

from bisect import bisect_left

from epserve.actors.model.config import FULL, ModelConfig


class CpuDevice:
    kind = "cpu"

    def __init__(self, cal: dict, cfg: ModelConfig):
        self.cal, self.cfg = cal, cfg
        self.cores = float(cal["cores"])
        self.itemsize = int(cal["itemsize"])
        self.contention = float(cal.get("contention", 1.0))  # slowdown of experts computed on several cores
        self.tables = {tuple(map(int, key.split(","))): sorted(points) for key, points in cal["gemm"].items()}

    def gemm(self, rows, n, k):
        if rows == 0:
            return 0.0
        table = self.tables.get((n, k))
        if table is None:  # a shape not measured: the nearest one's time per multiply-add
            (n0, k0), table = min(self.tables.items(), key=lambda kv: abs(kv[0][0] * kv[0][1] - n * k))
            return _interpolate(table, rows) * n * k / (n0 * k0)
        return _interpolate(table, rows)

    def experts(self, slots, active, held):
        if slots == 0:
            return 0.0
        c0, per_active, per_slot = self.cal["experts"]
        return c0 + per_active * active + per_slot * slots

    def attention(self, rows, keys, layer_kind):
        shape = self.cfg.full if layer_kind == FULL else self.cfg.sliding
        return self.cal["attention_s"] * keys * self.cfg.num_heads * shape.head_dim

    def elementwise(self, tokens):
        return self.cal["elementwise_s"] * tokens

    def step_overhead(self, seqs, sampled):
        return self.cal["step_s"] + self.cal["step_per_seq_s"] * seqs

    def exchange(self, nbytes, messages, cross_node):
        if messages == 0:
            return 0.0
        return self.cal["exchange_latency_s"] * messages + nbytes / self.cal["exchange_bw"]


def _interpolate(points: list[list[float]], rows: float) -> float:
    """Piecewise linear in rows between measured points; beyond the last, proportional to rows."""
    xs = [p[0] for p in points]
    i = bisect_left(xs, rows)
    if i < len(xs) and xs[i] == rows:
        return points[i][1]
    if i == 0:
        return points[0][1]
    if i == len(xs):
        return points[-1][1] * rows / xs[-1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)
