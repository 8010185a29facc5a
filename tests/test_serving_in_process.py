"""Both servers on one ServingState, without Ray (an in-process Frontend; helpers.InProcessServer): the gRPC
API cuts the text at stop strings exactly as the OpenAI API does (one TextStream), both describe the model
with every fact of its ModelInfo, and both refuse a request longer than the model's context, naming it. A
Frontend's start returns once its warm-up is done, so that the first request waits for none."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest

from epserve.actors.frontend import Frontend
from epserve.cluster.api import inference_pb2 as pb
from epserve.cluster.api import inference_pb2_grpc as pb_grpc
from epserve.cluster.tools.client import request

from helpers import InProcessServer, engine_greedy, spanning_stop, wait_idle

ENGINE = dict(max_model_len=512, kv_cache_bytes=32 << 20, enable_prefix_caching=False)
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def server(tiny_dir):
    s = InProcessServer(tiny_dir, "tiny", ENGINE)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.InferenceStub(channel)


def test_grpc_stop_strings_cut_the_text_as_http_does(server, stub, tiny_model):
    tok = server.tokenizer
    want = engine_greedy(tiny_model, [tok.encode(PROMPT)], 24)[0]
    d = tok.detokenizer()
    pieces = [d.step([t]) for t in want]
    stop, k = spanning_stop(pieces)
    # the engine stops at the token whose text completes the stop string
    needed = next(i + 1 for i in range(len(pieces)) if len("".join(pieces[:i + 1])) >= k + len(stop))
    assert needed < 24
    req = request(PROMPT, max_tokens=24, ignore_eos=True, stop=["never there", stop])
    pieces = list(stub.Generate(req, timeout=60))
    assert "".join(p.text for p in pieces) == tok.decode(want)[:k]
    assert [t for p in pieces for t in p.token_ids] == want[:needed]
    assert pieces[-1].finish_reason == pb.FINISH_REASON_STOP and pieces[-1].usage.completion_tokens == needed
    whole = stub.Complete(req, timeout=60)
    assert whole.text == tok.decode(want)[:k] and whole.finish_reason == pb.FINISH_REASON_STOP
    http = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                            stop=["never there", stop], extra_body={"ignore_eos": True})
    assert http.choices[0].text == whole.text and http.usage.completion_tokens == needed
    wait_idle(server)  # the requests were aborted at the stop string: the engine holds none


@pytest.mark.parametrize("stop, words", [(["a"] * 17, "at most 16"), (["s" * 257], "at most 256 characters")])
def test_grpc_stop_strings_are_checked(stub, stop, words):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request(prompt_ids=[5, 6], max_tokens=2, stop=stop), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("sampling.stop: ") and words in err.value.details()


def test_grpc_stop_strings_need_a_tokenizer(server, stub):
    tokenizer, server.state.tokenizer = server.state.tokenizer, None
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request(prompt_ids=[5, 6], max_tokens=2, stop=["x"]), timeout=30))
    finally:
        server.state.tokenizer = tokenizer
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("sampling.stop: ") and "no tokenizer" in err.value.details()


def test_both_apis_describe_the_model_with_every_fact_of_model_info(server, stub):
    facts = dataclasses.asdict(server.frontend.model_info())
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert {k: getattr(info, k) for k in facts} == {**facts, "eos_token_ids": list(facts["eos_token_ids"])}
    assert (info.model_name, info.has_tokenizer, info.vocab_size) == ("tiny", True, 1024)
    card = server.client.models.retrieve("tiny").model_dump()
    assert {k: card[k] for k in facts} == {**facts, "eos_token_ids": list(facts["eos_token_ids"])}


@pytest.fixture(scope="module")
def short_context(short_context_dir):
    """A model trained for 2048 positions, with a KV cache that could hold far more."""
    s = InProcessServer(short_context_dir, "short", dict(kv_cache_bytes=64 << 20))
    yield s
    s.stop()


def test_a_request_longer_than_the_models_context_is_refused_naming_it(short_context):
    assert short_context.frontend.engine.runner.full_capacity > 2048
    assert short_context.state.info.max_model_len == 2048
    prompt = [5] * 5000
    status, body = short_context.post("/v1/completions", {"prompt": prompt, "max_tokens": 16})
    assert status == 400 and body["error"]["param"] == "prompt"
    assert "context length 2048" in body["error"]["message"]
    with grpc.insecure_channel(short_context.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.InferenceStub(channel).Complete(request(prompt_ids=prompt, max_tokens=16), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("token_ids: ") and "context length 2048" in err.value.details()
    status, body = short_context.post("/v1/completions", {"prompt": [5] * 1000, "max_tokens": 4})
    assert status == 200 and body["usage"]["completion_tokens"] == 4  # within the context: served


def test_start_returns_once_the_warm_up_is_done(tiny_dir):
    """The engine thread warms up before it serves: ``start`` (and so the cluster's readiness, which waits for
    it) returns only then, and the first request is served without waiting for it."""
    frontend = Frontend(str(tiny_dir), 0, dict(ENGINE, warm_up=True), dtype="float32")
    warm_up, slow = frontend.engine.warm_up, 1.0  # well above a tiny request on a busy CI machine

    def slow_warm_up():  # a warm-up as long as a real model's on a CPU, relative to a tiny request
        time.sleep(slow)
        warm_up()

    frontend.engine.warm_up = slow_warm_up

    async def go():
        t0 = time.monotonic()
        await frontend.start()
        started, steps = time.monotonic() - t0, frontend.engine.num_steps
        t0 = time.monotonic()
        out = await frontend.generate([[5, 6, 7]], None)
        served = time.monotonic() - t0
        await frontend.stop()
        return started, steps, served, out

    started, steps, served, out = asyncio.run(go())
    assert started >= slow and steps >= 1  # the warm-up's steps ran before start returned
    assert served < slow and out[0]["finish_reason"] in ("length", "stop")
