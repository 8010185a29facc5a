"""The commands as a new user runs them, each starting (and stopping) a Ray cluster of its own: ``epserve
demo`` (the README's first command) answers a prompt and exits, and ``epserve serve`` stops on Ctrl-C; neither
leaves a process behind. Every process they start carries a marker in its environment (Ray passes the
environment on to the processes it starts), so leftovers are found among all of the machine's processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helpers import EPSERVE, free_port

def marked(marker: str) -> list[int]:
    """Pids of live processes whose environment holds the marker."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def assert_nothing_left(marker: str, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while marked(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = marked(marker)
    for pid in left:  # never leave them running after a failure
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


# Lines that look like failures, which a healthy start and a clean stop used to print (Serve's notice about
# options "not applied" on a brand-new cluster, Ray's report of the Serve controller's tasks when it is shut down)
ALARMING = ("will not be applied", "killed by `ray.kill`", "Traceback", "ERROR")


def assert_quiet(output: str) -> None:
    found = [line for line in output.splitlines() if any(words in line for words in ALARMING)]
    assert not found, found


def as_in_a_terminal() -> None:
    """Ctrl-C's default action, as a command run in a terminal has it: a shell that starts a command in the
    background (as CI may start this suite) makes it ignore SIGINT, and that is inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def env(tmp_path):
    """A fresh environment: no address of the test session's Ray cluster, a cache of its own (the built-in
    model is made there), and the marker."""
    marker = f"EPSERVE_TEST_RUN={uuid.uuid4().hex}"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    environ.update(dict([marker.split("=")]), EPSERVE_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    return environ, marker


@pytest.mark.timeout(600)
def test_demo_answers_a_prompt_and_leaves_nothing_behind(env):
    environ, marker = env
    done = subprocess.run([*EPSERVE, "demo", "--prompt", "Hello", "--grpc-port", str(free_port()),
                           "--http-port", str(free_port())], env=environ, capture_output=True, text=True,
                          timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    answer = done.stdout.split("answer (streamed):\n", 1)[1].split("To keep serving", 1)[0]
    assert answer.strip(), done.stdout  # a real, non-empty answer streamed back
    assert "epserve serve" in done.stdout
    assert "the built-in model has random weights: its answer is gibberish" in done.stdout  # says why it is
    assert_quiet(done.stdout + done.stderr)
    assert_nothing_left(marker)


@pytest.mark.timeout(600)
def test_serve_stops_on_ctrl_c_and_leaves_nothing_behind(env):
    environ, marker = env
    grpc_port = free_port()
    proc = subprocess.Popen([*EPSERVE, "serve", "--grpc-port", str(grpc_port), "--http-port", str(free_port()),
                             "--metrics-port", str(free_port())], env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=as_in_a_terminal)
    try:
        lines = []
        for line in proc.stdout:  # until it says it serves (or exits)
            lines.append(line)
            if "is serving" in line:
                break
        assert f"127.0.0.1:{grpc_port}" in "".join(lines), "".join(lines)[-3000:]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-3000:]
        assert "shutting down" in out
        assert_quiet("".join(lines) + out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert_nothing_left(marker)
