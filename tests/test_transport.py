"""The expert exchange's transports (actors/transport.py) between real processes: shared memory and gloo keep
the same contract (an element-wise max header; an all-to-all of rows with uneven and zero counts, blocking or
not), and shared memory fails as a lost peer should: a silent peer by the deadline, a peer that leaves at once,
an oversized message with a clear error, and no segment left behind in /dev/shm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from epserve.actors.transport import shm_available

WORKER = r'''
import json, sys, time, torch, torch.distributed as dist
from epserve.actors import process_group
from epserve.actors.transport import TransportError

mode, backend, rank, world, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
timeout = float(sys.argv[6])
store = None
if rank == 0:
    store = dist.TCPStore("127.0.0.1", port, world, is_master=True, wait_for_workers=False)
t = process_group.join(rank, world, backend, "127.0.0.1", port, timeout, store=store, capacity=4096)
out = {"rank": rank, "path": getattr(t, "path", None)}
try:
    if mode == "contract":
        for step in range(40):
            h = t.header(torch.tensor([step, rank * 10 + step % 3], dtype=torch.int64))
            assert h.tolist() == [step, (world - 1) * 10 + step % 3], h
            send_rows = [(rank + p + step) % 3 for p in range(world)]
            recv_rows = [(p + rank + step) % 3 for p in range(world)]
            send = torch.cat([torch.tensor([[rank, p, i, step]] * 1, dtype=torch.float32)
                              for p in range(world) for i in range(send_rows[p])] or [torch.empty(0, 4)])
            recv, wait = t.all_to_all(send, send_rows, recv_rows, async_op=step % 2 == 1)
            wait()
            want = [[p, rank, i, step] for p in range(world) for i in range(recv_rows[p])]
            assert recv.tolist() == want, (recv.tolist(), want)
        # every rank done before any leaves: leaving fails the others' waits, and a rank that got no rows from a
        # slow third could leave while another still waits for that third's rows
        t.header(torch.zeros(1, dtype=torch.int64))
        out["ok"] = True
    elif mode == "silent" and rank == 0:
        start = time.monotonic()
        try:
            t.all_to_all(torch.empty(0, 4), [0, 0], [0, 1])
        except TransportError as e:
            out["error"], out["waited"] = str(e), time.monotonic() - start
    elif mode == "leaves":
        if rank == 1:
            time.sleep(0.5)
            process_group.leave()
        else:
            start = time.monotonic()
            try:
                t.all_to_all(torch.empty(0, 4), [0, 0], [0, 1])
            except TransportError as e:
                out["error"], out["waited"] = str(e), time.monotonic() - start
    elif mode == "oversized" and rank == 0:
        try:
            t.all_to_all(torch.zeros(2000, 4), [0, 2000], [0, 0])
        except TransportError as e:
            out["error"] = str(e)
    if mode != "contract":
        time.sleep(1.5 if rank else 0)  # rank 1 outlives rank 0's wait in "silent"
finally:
    print(json.dumps(out), flush=True)
    process_group.leave()
'''


def run_ranks(tmp_path, mode: str, backend: str, world: int, timeout_s: float) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    env = os.environ | {"GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen([sys.executable, str(script), mode, backend, str(r), str(world), str(port),
                               str(timeout_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    ends = [p.communicate(timeout=120) for p in procs]
    failed = [f"rank {r}: {stderr[-2000:]}" for r, (p, (_, stderr)) in enumerate(zip(procs, ends)) if p.returncode]
    assert not failed, "\n".join(failed)  # every failed rank's own words: the first to fail names the cause
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in ends]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


needs_shm = pytest.mark.skipif(not shm_available(), reason="no /dev/shm or no native kernels here")


@pytest.mark.parametrize("backend", [pytest.param("shm", marks=needs_shm), "gloo"])
def test_transports_keep_one_contract(tmp_path, backend):
    outs = run_ranks(tmp_path, "contract", backend, world=3, timeout_s=30)
    assert all(o.get("ok") for o in outs)
    if backend == "shm":  # the segment's name goes once every rank has mapped it
        assert outs[0]["path"].startswith("/dev/shm/") and not os.path.exists(outs[0]["path"])


@needs_shm
def test_a_silent_peer_fails_the_wait_at_the_deadline(tmp_path):
    rank0 = run_ranks(tmp_path, "silent", "shm", world=2, timeout_s=1.0)[0]
    assert "no rows from rank 1 within 1 s" in rank0["error"]
    assert 0.9 <= rank0["waited"] < 3


@needs_shm
def test_a_peer_that_leaves_fails_the_wait_at_once(tmp_path):
    start = time.monotonic()
    rank0 = run_ranks(tmp_path, "leaves", "shm", world=2, timeout_s=60)[0]
    assert "a peer left the group" in rank0["error"]
    assert rank0["waited"] < 5 and time.monotonic() - start < 30  # not the 60 s deadline


@needs_shm
def test_an_oversized_message_is_a_clear_error(tmp_path):
    rank0 = run_ranks(tmp_path, "oversized", "shm", world=2, timeout_s=5)[0]
    assert "exceeds the shared-memory mailbox's 4096" in rank0["error"]
