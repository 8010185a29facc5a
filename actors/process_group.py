"""Rendezvous of the front-end and the shards into one ``torch.distributed`` process group.

Rank 0 opens a TCPStore on port 0 (the OS picks a free port: no race between clusters on one machine) and
tells the driver its address; the other ranks join with it. gloo on CPUs, NCCL when every rank has a GPU.
The timeout bounds every collective, so a dead or stalled peer surfaces as an error, not a hang. A group
whose collective failed is not repaired: every rank leaves it, and all of them join a new one on a new store
(``join`` destroys the old group first), which is how the cluster recovers from a lost rank.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (tests of the dispatcher itself)
        return "127.0.0.1"


def open_store(world_size: int, timeout_s: float) -> tuple[dist.TCPStore, str, int]:
    host = node_ip()
    store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    return store, host, store.port


def join(rank: int, world_size: int, backend: str, host: str, port: int, timeout_s: float, store=None) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    store = store or dist.TCPStore(host, port, world_size, is_master=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and host.startswith("127."):
        os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else names[0]


def device_for_actor() -> torch.device:
    """The GPU Ray gave this actor, or the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
