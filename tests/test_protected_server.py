"""The server with its protections on, end to end: a real Serve app on the session's Ray cluster (a front-end
and one expert shard) with gRPC over TLS, HTTPS from Serve's HTTP proxy (a self-signed certificate made for
the test), a bearer token read from a file, and a small waiting queue (2 running + 2 waiting requests).

* TLS: a plaintext client cannot talk to either port; a client that trusts the certificate can.
* Auth: inference calls without the token (or with a wrong one) are refused (UNAUTHENTICATED / 401), with
  it they succeed; health checks need no token; the token never shows in any log of the Ray session.
* Overload: a burst beyond the queue gets RESOURCE_EXHAUSTED (HTTP 429) at once while the admitted requests
  complete; afterwards the engine holds no request and no KV block, and the ingress replica's memory does not
  grow from burst to burst.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.cluster.tools import client
from epserve.cluster.api import inference_pb2 as pb
from epserve.cluster.api import inference_pb2_grpc as pb_grpc
from epserve.cluster.serving.local import LocalServer

from helpers import free_port

TOKEN = f"epserve-test-{secrets.token_hex(16)}"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
RUNNING, WAITING = 2, 2  # the engine's max_num_seqs and max_waiting
BURST = 12


@pytest.fixture(scope="module")
def server(ray_session, tiny_dir, tls_files, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    settings = {"cluster": {"checkpoint": str(tiny_dir), "shards": 1,
                            "engine": {"max_model_len": 256, "max_num_seqs": RUNNING, "max_waiting": WAITING}},
                "grpc_port": free_port(), "tls_cert_file": tls_files.cert, "tls_key_file": tls_files.key,
                "auth_token_file": str(token_file)}
    srv = LocalServer(settings, "127.0.0.1", free_port()).start(timeout_s=300)
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def https(server, tls_files):
    """(ssl context trusting the test certificate, the HTTPS base URL)."""
    return ssl.create_default_context(cafile=tls_files.cert), f"https://127.0.0.1:{server.http_port}"


def http_call(context, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a GET (no body) or POST."""
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def short_request(max_tokens: int = 3) -> pb.GenerateRequest:
    return client.request(prompt_ids=[5, 6, 7], max_tokens=max_tokens, ignore_eos=True)


def health_status(channel, metadata=()) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10,
                                                     metadata=metadata).status


# --------------------------------------------------------------------------------------------- TLS


def test_plaintext_clients_cannot_connect_tls_clients_can(server, tls_files, https):
    with grpc.insecure_channel(server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_status(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with client.channel(server.grpc_target, tls_files.cert) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(OSError):  # a plaintext request to the HTTPS port: the TLS handshake fails, no answer
        urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/health", timeout=30)
    context, base = https
    status, body, _ = http_call(context, f"{base}/health")
    assert (status, body["status"]) == (200, "SERVING")


# --------------------------------------------------------------------------------------------- auth


def test_grpc_calls_need_the_token_health_checks_do_not(server, tls_files):
    with client.channel(server.grpc_target, tls_files.cert) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for metadata in ((), (("authorization", "Bearer not-the-token"),), (("authorization", TOKEN),)):
            for call in (lambda m: list(stub.Generate(short_request(), timeout=30, metadata=m)),
                         lambda m: stub.ModelInfo(pb.ModelInfoRequest(), timeout=30, metadata=m)):
                with pytest.raises(grpc.RpcError) as err:
                    call(metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in err.value.details()
        pieces = list(stub.Generate(short_request(), timeout=60, metadata=AUTH))
        assert sum(len(p.token_ids) for p in pieces) == 3
        assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=30, metadata=AUTH).num_shards == 1
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING  # no token needed


def test_http_calls_need_the_token_health_checks_do_not(server, https, tiny_dir):
    import openai

    context, base = https
    body = {"model": tiny_dir.name, "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
    for token in (None, "not-the-token"):
        status, refused, headers = http_call(context, f"{base}/v1/completions", body, token)
        assert status == 401 and refused["error"]["code"] == "invalid_api_key", refused
        assert headers.get("www-authenticate") == "Bearer"
        assert http_call(context, f"{base}/v1/models", token=token)[0] == 401
    status, answer, _ = http_call(context, f"{base}/v1/completions", body, TOKEN)
    assert status == 200 and answer["usage"]["completion_tokens"] == 3
    assert http_call(context, f"{base}/health")[0] == 200
    # the official client: the token is its api_key
    with openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0,
                       http_client=openai.DefaultHttpxClient(verify=context)) as api:
        done = api.completions.create(model=tiny_dir.name, prompt="Hello", max_tokens=4,
                                      extra_body={"ignore_eos": True})
        assert done.usage.completion_tokens == 4


# --------------------------------------------------------------------------------------------- overload


async def _burst(server, tls_files, n: int, max_tokens: int, probe=None,
                 cancel: int = 0) -> tuple[list[dict], object]:
    """``n`` concurrent streams: per stream its status code, details, tokens and seconds; and what ``probe``
    (a function run in a thread once the refusals have come back, while the admitted streams run) returned.
    The first ``cancel`` streams to get a token are cancelled by the client then."""
    credentials = grpc.ssl_channel_credentials(Path(tls_files.cert).read_bytes())
    outcomes: list[dict] = []
    refused = asyncio.Event()
    async with grpc.aio.secure_channel(server.grpc_target, credentials) as channel:
        stub = pb_grpc.InferenceStub(channel)

        cancelled = []

        async def one(i):
            t0, tokens = time.monotonic(), 0
            req = client.request(prompt_ids=[5 + i, 6, 7], max_tokens=max_tokens, ignore_eos=True)
            call = stub.Generate(req, timeout=120, metadata=AUTH)
            try:
                async for piece in call:
                    tokens += len(piece.token_ids)
                    if len(cancelled) < cancel and i not in cancelled:
                        cancelled.append(i)
                        call.cancel()
                out = {"code": grpc.StatusCode.OK, "details": ""}
            except asyncio.CancelledError:
                out = {"code": grpc.StatusCode.CANCELLED, "details": ""}
            except grpc.RpcError as e:
                out = {"code": e.code(), "details": e.details()}
            outcomes.append({**out, "tokens": tokens, "seconds": time.monotonic() - t0})
            if sum(o["code"] != grpc.StatusCode.OK for o in outcomes) >= n - RUNNING - WAITING:
                refused.set()

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        probed = None
        if probe is not None:
            await asyncio.wait_for(refused.wait(), 60)
            probed = await asyncio.to_thread(probe)
        await asyncio.wait_for(asyncio.gather(*tasks), 180)
    return outcomes, probed


def _engine_empty(timeout_s: float = 30.0) -> dict:
    """The front-end's stats once it holds no request (or after ``timeout_s``), with ``streams``: its output
    streams still open (one per request whose caller may still read)."""
    frontend = ray.get_actor("epserve-frontend-0", namespace="epserve")
    deadline = time.monotonic() + timeout_s
    while True:
        stats = ray.get(frontend.stats.remote(), timeout=30)
        stats["streams"] = ray.get(frontend.__ray_call__.remote(lambda f: len(f._streams)), timeout=30)
        if (stats["running"], stats["waiting"], stats["kv_blocks_used"], stats["streams"]) == (0, 0, 0, 0) \
                or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def _empty(stats: dict) -> tuple:
    return stats["running"], stats["waiting"], stats["kv_blocks_used"], stats["streams"]


def test_a_burst_beyond_the_queue_is_refused_at_once_and_the_admitted_complete(server, tls_files, https,
                                                                                  tiny_dir):
    context, base = https
    body = {"model": tiny_dir.name, "prompt": [5, 6, 7], "max_tokens": 3}
    outcomes, (http_status, http_body, _) = asyncio.run(_burst(
        server, tls_files, BURST, 64, probe=lambda: http_call(context, f"{base}/v1/completions", body, TOKEN)))
    admitted = [o for o in outcomes if o["code"] == grpc.StatusCode.OK]
    refused = [o for o in outcomes if o["code"] != grpc.StatusCode.OK]
    assert len(admitted) == RUNNING + WAITING and all(o["tokens"] == 64 for o in admitted)
    assert {o["code"] for o in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("at capacity" in o["details"] for o in refused), refused[0]["details"]
    # at once: before any admitted request could finish, and without a token of output
    assert max(o["seconds"] for o in refused) < min(o["seconds"] for o in admitted)
    assert all(o["tokens"] == 0 for o in refused)
    assert http_status == 429 and http_body["error"]["type"] == "rate_limit_error", http_body
    assert _empty(_engine_empty()) == (0, 0, 0, 0)


def _rss_bytes(actor_class: str) -> int:
    """Resident memory of the live actor of a class (the ingress replica, the front-end)."""
    from ray._private.state import state  # the GCS's actor table (the state API needs the dashboard)

    (pid,) = [a["Pid"] for a in state.actor_table(None).values()
              if a["ActorClassName"] == actor_class and a["State"] == "ALIVE"]
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


MEMORY_OF = ("ServeReplica:epserve:Ingress", "Frontend")  # what holds requests: the servers and the engine


def test_memory_returns_to_its_baseline_after_bursts(server, tls_files):
    """Bursts with refusals and with clients that cancel mid-stream: nothing of them stays behind, in the
    ingress replica (the servers' streams) or in the front-end (the engine's requests and KV)."""
    rss = []
    for _ in range(6):
        outcomes, _ = asyncio.run(_burst(server, tls_files, BURST, 12, cancel=1))
        codes = [o["code"] for o in outcomes]
        assert len(outcomes) == BURST and codes.count(grpc.StatusCode.CANCELLED) == 1
        assert all(o["tokens"] == 12 for o in outcomes if o["code"] == grpc.StatusCode.OK)
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
        assert _empty(_engine_empty()) == (0, 0, 0, 0)
        rss.append([_rss_bytes(actor) for actor in MEMORY_OF])
    # the first burst warms up (imports, first-use buffers): its end is the baseline; after it, each burst
    # leaves memory where it found it, within allocator noise
    for i, actor in enumerate(MEMORY_OF):
        mib = [r[i] >> 20 for r in rss]
        assert max(mib[1:]) - mib[1] < 16, (actor, mib)


# --------------------------------------------------------------------------------------------- secrets


def test_the_token_is_never_logged(server, https):
    context, base = https
    http_call(context, f"{base}/v1/models", token="Bearer-but-wrong")  # refusals are logged too
    assert TOKEN not in json.dumps(server.config.to_dict())  # the settings (stored by Ray) only say where it is
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    time.sleep(2)  # let the replica's log handlers flush
    leaked = [str(f) for f in logs.rglob("*") if f.is_file() and TOKEN in f.read_text(errors="ignore")]
    assert not leaked, leaked


def test_token_sources_and_comparison(tmp_path, monkeypatch):
    from epserve.cluster.cli import build_parser, server_config
    from epserve.cluster.serving.security import BearerToken, load_token

    monkeypatch.setenv("EPSERVE_TEST_TOKEN", " abc \n")
    assert load_token(env="EPSERVE_TEST_TOKEN") == "abc"
    (tmp_path / "token").write_text("xyz\n")
    (tmp_path / "empty").write_text("\n")
    assert load_token(str(tmp_path / "token")) == "xyz"
    for source in ({"env": "EPSERVE_UNSET_TOKEN"}, {"path": str(tmp_path / "missing")},
                   {"path": str(tmp_path / "empty")}):
        with pytest.raises(ValueError):  # auth asked for but no token: refuse to start, never serve open
            load_token(**source)
    token = BearerToken("abc")
    assert "abc" not in repr(token) and token.accepts("Bearer abc") and token.accepts("bearer  abc ")
    assert not any(token.accepts(h) for h in (None, "", "abc", "Bearer ab", "Bearer abcd", "Basic abc"))
    # `epserve serve` with the token in its environment: the settings name the variable, never the value
    monkeypatch.setenv("EPSERVE_AUTH_TOKEN", "s3cret-value")
    settings = server_config(build_parser().parse_args(["serve"])).to_dict()
    assert settings["auth_token_env"] == "EPSERVE_AUTH_TOKEN" and "s3cret-value" not in json.dumps(settings)
    settings = server_config(build_parser().parse_args(["serve", "--auth-token-file", str(tmp_path / "token")]))
    assert settings.auth_token_file == str(tmp_path / "token") and settings.auth_token_env is None
