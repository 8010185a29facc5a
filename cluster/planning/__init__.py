"""``epserve plan``: what a layout of front-ends and expert shards holds in memory and how fast it serves.

params.py (parameters by role, from the config) -> memory.py (bytes per rank, KV capacity) -> hardware.py (the
devices and links, with sources) and calibrate.py (this machine, measured) -> stepmodel.py (one engine step,
phase by phase) -> predict.py (a workload through the engine's scheduler: tok/s, TTFT, ITL, bottleneck) ->
search.py (the best layout for a GPU budget) -> report.py (table, JSON, Helm values)."""
