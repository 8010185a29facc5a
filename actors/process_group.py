"""Rendezvous of the front-end and the shards into one group, and the transport it talks over
(actors/transport.py): a ``torch.distributed`` process group (gloo on CPUs, NCCL when every rank has a GPU),
or, for CPU ranks on one host, a shared-memory segment (``backend="shm"``).

Rank 0 opens a TCPStore on port 0 (the OS picks a free port: no race between clusters on one machine) and
tells the driver its address; the other ranks join with it (for shared memory, rank 0 creates the segment and
publishes its name in the store). The timeout bounds every collective, so a dead or stalled peer surfaces as
an error, not a hang. A group whose collective failed is not repaired: every rank leaves it, and all of them
join a new one on a new store (``join`` leaves the old one first), which is how the cluster recovers from a
lost rank. A process is in one group at a time.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist

from .transport import DistTransport, ShmTransport, Transport, TransportError, new_segment_name


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (tests of the dispatcher itself)
        return "127.0.0.1"


def node_id() -> str:
    """This process's Ray node (its IP outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return node_ip()


def open_store(world_size: int, timeout_s: float) -> tuple[dist.TCPStore, str, int]:
    host = node_ip()
    store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    return store, host, store.port


_transport: Transport | None = None  # this process's group


def join(rank: int, world_size: int, backend: str, host: str, port: int, timeout_s: float, store=None,
         capacity: int = 0) -> Transport:
    """Join a new group (leaving this process's previous one). ``capacity``: for ``shm``, the largest message
    in bytes between two ranks."""
    global _transport
    leave()
    store = store or dist.TCPStore(host, port, world_size, is_master=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "shm":
        if rank == 0:
            name = new_segment_name()
            _transport = ShmTransport(name, rank, world_size, capacity, timeout_s, create=True)
            store.set("shm", name)
        else:
            _transport = ShmTransport(store.get("shm").decode(), rank, world_size, capacity, timeout_s, create=False)
        try:
            store.add("joined", 1)  # a barrier, as init_process_group's: every rank has attached
            _wait_count(store, "joined", world_size, timeout_s)
        finally:
            if rank == 0:
                _transport.unlink()
        return _transport
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and host.startswith("127."):
        os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _transport = DistTransport()
    return _transport


def _wait_count(store, key: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < count:
        if time.monotonic() > deadline:
            raise TransportError(f"only {store.add(key, 0)} of {count} ranks joined within {timeout_s:g} s")
        time.sleep(0.01)


def leave() -> None:
    """Leave this process's group: the peers' waits on it fail now, not at their deadline."""
    global _transport
    if _transport is not None:
        _transport.close()
        _transport = None
    if dist.is_initialized():
        dist.destroy_process_group()


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else names[0]


def bind_cpus(cpus: list[int] | None) -> None:
    """Run this process on ``cpus`` only: each of its threads (affinity is per thread on Linux; threads
    started later inherit it); None: wherever the OS likes."""
    if cpus is not None:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), cpus)


def device_for_actor() -> torch.device:
    """The GPU Ray gave this actor, or the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
