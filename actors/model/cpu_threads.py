"""One OpenMP team per process: the thread that computes owns the cores.

torch's CPU operators and our kernels (cpu_kernels.py) run each parallel region on an OpenMP team that the
calling thread keeps between regions; its workers spin for a while before they sleep, so the next region
starts in about a microsecond. libgomp spins only while the threads it manages fit the CPUs: a second team
(the constructor's thread loaded the weights on one, the engine thread computes on another) makes every
worker sleep at once, and each region then starts with a futex wake-up. On a 2-core machine that cost 45 us
per region, and the `tiny` preset's 68 steps of the peers workload took 1.32 s instead of 0.76 s
(docs/performance.md "On a CPU with AMX"). ``release_team`` hands the calling thread's idle team back
(OpenMP 5's omp_pause_resource_all), so the thread that runs the engine is the only one with a team.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("epserve.cpu_threads")
OMP_PAUSE_SOFT = 1


def release_team() -> bool:
    """Give back the calling thread's OpenMP workers (after loading, before another thread computes). False
    where the OpenMP runtime has no such call (then nothing changes)."""
    try:
        gomp = ctypes.CDLL("libgomp.so.1")  # the one torch loaded (same soname)
        return gomp.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
    except (OSError, AttributeError) as e:
        log.debug("OpenMP team not released: %s", e)
        return False
