"""What ``epserve plan`` prints: the plan as one JSON-ready dict (``build``), a table for people (``table``),
what does not fit (``memory_problems``), and the layout as values for the Helm chart (``write_helm_values``)."""

from __future__ import annotations

from pathlib import Path

import yaml

from epserve.actors.model import precision

from .memory import Rank
from .params import ParamCount
from .predict import Prediction, Workload
from .stepmodel import PHASES, Layout

CHART = Path(__file__).resolve().parents[2] / "helm" / "epserve"


def memory_problems(ranks: list[Rank], layout: Layout, work: Workload, shared: bool, capacity: int,
                    reserve: float) -> list[str]:
    usable = capacity * (1 - reserve)
    out = []
    if shared:  # one host: every rank in its memory
        used = sum(r.used_bytes for r in ranks)
        if used > capacity:
            out.append(f"the ranks need {used / 1e9:.1f} GB, the host has {capacity / 1e9:.1f} GB")
    else:
        for r in ranks:
            if r.weight_bytes + r.activation_bytes > usable:
                out.append(f"{r.role} {r.index} needs {(r.weight_bytes + r.activation_bytes) / 1e9:.1f} GB "
                           f"of weights and activations, a GPU has {usable / 1e9:.1f} GB usable")
    need = -(-work.concurrency // layout.frontends) * (work.prompt_len + work.output_len)
    fe = next(r for r in ranks if r.role == "frontend")
    if fe.kv_tokens < need:
        out.append(f"a front-end's KV cache holds {fe.kv_tokens} tokens; its {-(-work.concurrency // layout.frontends)}"
                   f" requests need {need}")
    return out


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 3)


def _prediction(p: Prediction) -> dict:
    return {"output_tokens_per_s": round(p.output_tokens_per_s, 2), "ttft_ms": _ms(p.ttft_s), "itl_ms": _ms(p.itl_s),
            "decode_step_ms": _ms(p.decode_step.seconds),
            "phases_ms": {k: _ms(v) for k, v in p.decode_step.phases.items()}}


def _layout(lay: Layout) -> dict:
    return {"frontends": lay.frontends, "shards": lay.shards, "redundant_experts": lay.redundant,
            "nodes": lay.nodes, "gpus_per_node": lay.gpus_per_node, "link": lay.link}


def build(name, params: ParamCount, gpu: str, dtype, layout: Layout, work: Workload,
          ranks: list[Rank], prediction: Prediction, problems: list[str], source: str, search=None) -> dict:
    notes = []
    size = dtype.itemsize
    plan = {
        "model": name, "gpu": gpu, "dtype": precision.dtype_name(dtype), "layout": _layout(layout),
        "workload": {"prompt_len": work.prompt_len, "output_len": work.output_len,
                     "concurrency": work.concurrency, "requests": work.total_requests},
        "params_total": params.total, "params_active": params.active,
        "expert_bytes": params.experts * size, "frontend_weight_bytes": params.frontend * size,
        "ranks": [{"role": r.role, "index": r.index, "weight_bytes": r.weight_bytes, "weights_by_role": r.by_role,
                   "experts_per_layer": r.experts_per_layer, "kv_tokens": r.kv_tokens, "kv_bytes": r.kv_bytes,
                   "kv_blocks": r.kv_blocks, "activation_bytes": r.activation_bytes,
                   "capacity_bytes": r.capacity_bytes, "free_bytes": r.free_bytes} for r in ranks],
        "predicted": _prediction(prediction),
        "bottleneck": ("memory: " + problems[0]) if problems else prediction.bottleneck,
        "fits": not problems, "problems": problems, "notes": notes, "hardware": source,
    }
    if search is not None:
        cands, fastest, quickest = search
        row = lambda c: {**_layout(c.layout), **_prediction(c.prediction), "fits": c.fits,  # noqa: E731
                         "bottleneck": c.prediction.bottleneck if c.fits else "memory: " + c.why}
        plan["budget"] = {"gpus": len(cands) + 1, "candidates": [row(c) for c in cands],
                          "best_throughput": row(fastest) if fastest else None,
                          "best_itl": row(quickest) if quickest else None}
    return plan


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.2f} MB"


def table(plan: dict) -> str:
    lay, work, pred = plan["layout"], plan["workload"], plan["predicted"]
    where = "this machine" if plan["gpu"] == "cpu" else \
        f"{lay['frontends'] + lay['shards']} x {plan['gpu']} ({lay['nodes']} node(s), {lay['link']} between nodes)"
    lines = [f"epserve plan: {plan['model']} on {where}, {plan['dtype']}: {lay['frontends']} front-end(s) + "
             f"{lay['shards']} expert shard(s)" + (f", {lay['redundant_experts']} replicas" if lay["redundant_experts"]
                                                   else ""),
             f"parameters: {plan['params_total']:,} total, {plan['params_active']:,} active per token; routed "
             f"experts {_gb(plan['expert_bytes'])}, the rest {_gb(plan['frontend_weight_bytes'])}", "",
             f"{'rank':<12} {'weights':>10}  {'KV cache':>22}  {'left':>10}  weights by role"]
    for r in plan["ranks"]:
        kv = f"{_gb(r['kv_bytes'])} ({r['kv_tokens']:,} tok)" if r["role"] == "frontend" else "-"
        roles = ", ".join(f"{k} {_gb(v)}" for k, v in r["weights_by_role"].items() if v)
        if r["role"] == "shard":
            roles += f" ({r['experts_per_layer']} per layer)"
        lines.append(f"{r['role'] + ' ' + str(r['index']):<12} {_gb(r['weight_bytes']):>10}  {kv:>22}  "
                     f"{_gb(r['free_bytes']) if plan['gpu'] != 'cpu' else 'shared':>10}  {roles}")
    lines += ["", f"predicted, prompt {work['prompt_len']} + output {work['output_len']} tokens, concurrency "
                  f"{work['concurrency']}, {work['requests']} requests:",
              f"  output {pred['output_tokens_per_s']:,.1f} tok/s   TTFT {pred['ttft_ms']:,.1f} ms   ITL "
              f"{pred['itl_ms']:,.1f} ms   bottleneck: {plan['bottleneck']}",
              f"  decode step {pred['decode_step_ms']:,.2f} ms: " + " | ".join(
                  f"{k} {pred['phases_ms'][k]:,.2f}" for k in PHASES if pred["phases_ms"].get(k))]
    if "budget" in plan:
        b = plan["budget"]
        lines += ["", f"best split of {b['gpus']} GPUs (M front-ends + N shards):",
                  "  goal        M    N   output tok/s    TTFT ms    ITL ms   bottleneck"]
        for goal, c in (("throughput", b["best_throughput"]), ("ITL", b["best_itl"])):
            if c:
                lines.append(f"  {goal:<10} {c['frontends']:>2} {c['shards']:>4} {c['output_tokens_per_s']:>14,.1f} "
                             f"{c['ttft_ms']:>10,.1f} {c['itl_ms']:>9,.2f}   {c['bottleneck']}")
    lines += [f"note: {n}" for n in plan["notes"] + [f"problem: {p}" for p in plan["problems"]]]
    lines.append(f"hardware: {plan['hardware']}")
    return "\n".join(lines)


def helm_values(plan: dict, chart: Path = CHART) -> dict:
    """The chart's defaults with the plan's layout: shards, replicas of experts, shards per expert pod,
    placement, dtype, device, and the engine's batch and KV budget."""
    path = chart / "values.yaml"
    if not path.exists():
        raise ValueError(f"--helm-values needs the chart's defaults, not found at {path}")
    values = yaml.safe_load(path.read_text())
    lay, cpu = plan["layout"], plan["gpu"] == "cpu"
    fe = next(r for r in plan["ranks"] if r["role"] == "frontend")
    per_pod = max(d for d in range(1, min(lay["gpus_per_node"], lay["shards"]) + 1) if lay["shards"] % d == 0)
    values["cluster"].update(frontends=lay["frontends"], shards=lay["shards"],
                             placement="PACK" if lay["nodes"] == 1 else "SPREAD", device="cpu" if cpu else "cuda",
                             dtype=plan["dtype"])
    engine = {"max_num_seqs": -(-plan["workload"]["concurrency"] // lay["frontends"])}
    if not cpu:
        engine["kv_cache_bytes"] = fe["kv_bytes"]
    extra = values["cluster"].setdefault("extra", {})
    extra["engine"] = engine
    if lay["redundant_experts"]:
        extra["redundant_experts"] = lay["redundant_experts"]
    values["gpu"]["enabled"] = not cpu
    values["expert"]["shardsPerPod"] = 1 if cpu else per_pod
    return values


def write_helm_values(plan: dict, out: str) -> None:
    lay = plan["layout"]
    head = [f"# epserve plan: {plan['model']} on {plan['gpu']}, {lay['frontends']} front-end(s) + {lay['shards']} "
            f"shard(s); predicted {plan['predicted']['output_tokens_per_s']:,.1f} output tok/s, ITL "
            f"{plan['predicted']['itl_ms']:,.2f} ms"]
    head += [f"# {n} (the chart deploys one)" for n in plan["notes"] if "front-end" in n]
    Path(out).write_text("\n".join(head) + "\n" + yaml.safe_dump(helm_values(plan), sort_keys=False))
