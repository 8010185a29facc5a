"""Tools around the server: ``epserve client`` (client.py), ``epserve bench`` (bench.py, bench_targets.py) and
the recovery drills (drill.py)."""
