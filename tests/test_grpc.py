"""The gRPC endpoint end to end: a real Serve app on the session's Ray cluster (1 front-end + 2 shards),
real gRPC on 127.0.0.1, a stock health client and a stock reflection client."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
import ray
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.sampling import SamplingParams
from epserve.cluster.api import inference_pb2 as pb
from epserve.cluster.api import inference_pb2_grpc as pb_grpc
from epserve.cluster.client import request
from epserve.cluster.serve_app import LocalServer

MAX_LEN = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tiny_dir):
    settings = {"cluster": {"checkpoint": str(tiny_dir), "shards": 2,
                            "engine": {"max_model_len": MAX_LEN, "max_num_seqs": 64}},
                "grpc_port": free_port()}
    srv = LocalServer(settings, "127.0.0.1", free_port()).start(timeout_s=300)
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.InferenceStub(channel)


def engine_greedy(model, prompts, max_tokens):
    outs = LLMEngine(model, EngineConfig(max_num_seqs=64)).generate(
        prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return [o.token_ids for o in outs]


def kv_blocks_used() -> int:
    return ray.get(ray.get_actor("epserve-frontend", namespace="epserve").stats.remote())["kv_blocks_used"]


def test_health_goes_not_serving_then_serving_and_reflection(server):
    assert server.health_seen[-1] == "SERVING" and "NOT_SERVING" in server.health_seen
    with grpc.insecure_channel(server.grpc_target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "epserve.v1.Inference" in services and "grpc.health.v1.Health" in services


def test_streamed_tokens_equal_engine(stub, tiny_model):
    prompts = [[2, 17, 300, 42], [5, 6, 7] * 30]
    want = engine_greedy(tiny_model, prompts, 10)
    for prompt, expect in zip(prompts, want):
        pieces = list(stub.Generate(request(prompt_ids=prompt, max_tokens=10, ignore_eos=True, request_id="r1"),
                                    timeout=60))
        assert [t for p in pieces for t in p.token_ids] == expect
        assert all(p.request_id == "r1" for p in pieces) and len(pieces) == 10
        last = pieces[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), 10)
    whole = stub.Complete(request(prompt_ids=prompts[0], max_tokens=10, ignore_eos=True), timeout=60)
    assert list(whole.token_ids) == want[0] and whole.request_id
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert (info.num_shards, info.num_experts, info.max_model_len) == (2, tiny_model.cfg.num_experts, MAX_LEN)


def test_64_concurrent_streams_and_10_cancelled(server, tiny_model):
    prompts = [[3 + i, 7, 11 + (i * 13) % 900] + [i % 50 + 3] * (i % 20) for i in range(64)]
    want = engine_greedy(tiny_model, prompts, 16)
    cancelled = set(range(0, 64, 7)[:10])

    async def run():
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.InferenceStub(channel)

            async def one(i):
                call = stub.Generate(request(prompt_ids=prompts[i], max_tokens=16, ignore_eos=True), timeout=120)
                tokens = []
                async for piece in call:
                    tokens += piece.token_ids
                    if i in cancelled and len(tokens) >= 2:
                        call.cancel()
                        return None
                return tokens

            return await asyncio.gather(*(one(i) for i in range(64)), return_exceptions=True)

    results = asyncio.run(run())
    for i, got in enumerate(results):
        if i in cancelled:
            assert got is None or isinstance(got, asyncio.CancelledError)
        else:
            assert got == want[i], f"request {i}"
    for _ in range(50):  # aborts land within a step or two
        if kv_blocks_used() == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert kv_blocks_used() == 0


BAD = [
    (pb.GenerateRequest(), "input: set token_ids or text"),
    (request(prompt_ids=[]), "prompt: is empty"),
    (request(prompt_ids=[5, 5000]), "outside the vocabulary"),
    (request(prompt_ids=[5] * (MAX_LEN + 10)), "exceeds the context length"),
    (request(prompt_ids=[5], max_tokens=0), "max_tokens"),
    (request(prompt_ids=[5], max_tokens=-3), "max_tokens"),
    (request(prompt_ids=[5], temperature=-0.5), "temperature"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]), sampling=pb.SamplingParams(top_p=0.0)), "top_p"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]), sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]), sampling=pb.SamplingParams(top_k=-1)), "top_k"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]), sampling=pb.SamplingParams(stop_token_ids=[-4])),
     "stop_token_ids"),
]


@pytest.mark.parametrize("req,message", BAD)
def test_bad_requests_are_invalid_argument(stub, req, message):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(req, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    ok = list(stub.Generate(request(prompt_ids=[5, 6], max_tokens=2, ignore_eos=True), timeout=30))
    assert sum(len(p.token_ids) for p in ok) == 2  # still serving


def test_deadline_is_honoured_and_frees_blocks(stub):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request(prompt_ids=[5, 6, 7], max_tokens=400, ignore_eos=True), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(50):
        if kv_blocks_used() == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert kv_blocks_used() == 0


def test_text_in_text_out(stub, tiny_model, tiny_dir):
    from epserve.cluster.tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(tiny_dir)
    prompt = "The expert shards say hello"
    want = engine_greedy(tiny_model, [tok.encode(prompt)], 12)[0]
    pieces = list(stub.Generate(request(prompt, max_tokens=12, ignore_eos=True), timeout=60))
    assert [t for p in pieces for t in p.token_ids] == want
    assert "".join(p.text for p in pieces) == tok.decode(want)
    assert pieces[-1].usage.prompt_tokens == len(tok.encode(prompt))


def test_openai_client_through_serve(server, tiny_model, tiny_dir):
    """The OpenAI-compatible API as Serve's HTTP proxy serves it, driven by the official client."""
    import openai

    from epserve.cluster.tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(tiny_dir)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", timeout=60,
                           max_retries=0)
    name = tiny_dir.name
    assert [m.id for m in client.models.list().data] == [name]
    prompt = "Experts of the cluster"
    want = tok.decode(engine_greedy(tiny_model, [tok.encode(prompt)], 10)[0])
    done = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].text == want and done.usage.completion_tokens == 10
    pieces = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(p.choices[0].text for p in pieces if p.choices) == want
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="no-such-model", prompt=prompt, max_tokens=4)


def test_request_id_is_in_the_response_and_the_server_log(stub):
    from pathlib import Path
    import time

    rid = f"trace-{time.time_ns()}"
    pieces = list(stub.Generate(request(prompt_ids=[5, 6], max_tokens=2, ignore_eos=True, request_id=rid),
                                timeout=30))
    assert {p.request_id for p in pieces} == {rid}
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(rid in f.read_text(errors="ignore") for f in logs.rglob("*.log") if f.is_file()):
            return
        time.sleep(0.5)
    pytest.fail(f"request id {rid} not found in the server's logs under {logs}")
