"""One OpenMP team per process: the thread that computes owns the cores.

torch's CPU operators and our kernels (cpu_kernels.py) run each parallel region on an OpenMP team that the
calling thread keeps between regions; its workers spin for a while before they sleep, so the next region
starts in about a microsecond. libgomp spins only while the threads it manages fit the CPUs: a second team
(the constructor's thread loaded the weights on one, the engine thread computes on another) makes every
worker sleep at once, and each region then starts with a futex wake-up. On a 2-core machine that cost 45 us
per region, and the `tiny` preset's 68 steps of the peers workload took 1.32 s instead of 0.76 s
(docs/performance.md "On a CPU with AMX"). ``release_team`` hands the calling thread's idle team back
(OpenMP 5's omp_pause_resource_all), so the thread that runs the engine is the only one with a team.

``bind_team`` keeps that team one thread per CPU. Unbound, a worker that the engine thread wakes for a parallel
region goes where the scheduler puts it, and on cores shared with other processes (a cluster's front-end and
its shards on one host) it is often put on the engine thread's own core while the other is busy, where the
two take turns: on 2 cores (`tiny` fp32, 1 front-end + 2 shards) the front-end's engine thread was preempted
1,070 times a second, 567 of them by its own worker (``perf sched``). Bound, that cluster served 3,350 -> 3,750
output tok/s, and in bf16 4,510 -> 4,970 (docs/performance.md "On a CPU with AMX", run 17); the in-process
engine, alone on its cores, is unchanged. A team that does not span every CPU the process may use is left free
(binding would choose among the CPUs for whoever else runs there), and so is a team whose affinity the
environment sets (the operator's word stands; ``OMP_PROC_BIND=false`` measures the unbound team).

``pin_thread`` keeps a thread that computes alone (a team of one) on one CPU: a cluster's shards on the
front-end's host, shard i on CPU i + 1 of the process's, modulo their count (the front-end's engine thread
keeps CPU 0; ``OMP_PROC_BIND=false`` leaves the shards free too). Free, the two shards a dispatch wakes at
once were queued on one core in 23 % of the layers while the other core went idle (the scheduler rarely moves
a task that has just run), and the second began after the first had finished. One shard on each core, the
`tiny` fp32 cluster's decode step went 10.4-10.6 -> 9.6-9.9 ms, and 12.8-16.5 -> 10.7-12.9 ms in a slow spell,
the streamed workload 2-8 % more output tok/s, `bench` unchanged (docs/performance.md "On a CPU with AMX",
after run 17).
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

from . import cpu_kernels

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


AFFINITY_ENV = {"OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY"}


def bind_team(threads: int | None = None) -> list[int] | None:
    """Keep the calling thread's OpenMP team (``threads``, default torch's) one thread per CPU of this process,
    the calling thread on the first, where the team spans them all; returns those CPUs, or None where the team
    stays free (one thread, fewer threads than CPUs, affinity set in the environment, no native kernels)."""
    threads = threads or torch.get_num_threads()
    cpus = sorted(os.sched_getaffinity(0))
    if threads < 2 or threads < len(cpus) or AFFINITY_ENV & set(os.environ) or not cpu_kernels.available():
        return None
    if not cpu_kernels.bind_team(cpus, threads):
        return None
    log.info("OpenMP team of %d threads bound, one thread on each of CPUs %s", threads, cpus)
    return cpus


def pin_thread(index: int) -> int | None:
    """Keep the calling thread, which computes alone (one OpenMP thread), on the ``index``-th CPU of this
    process (modulo their count); returns that CPU, or None where it stays free (one CPU, a team of more than
    one, affinity set in the environment)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or torch.get_num_threads() != 1 or AFFINITY_ENV & set(os.environ):
        return None
    cpu = cpus[index % len(cpus)]
    os.sched_setaffinity(0, {cpu})  # 0: the calling thread
    log.info("computing thread pinned to CPU %d", cpu)
    return cpu
