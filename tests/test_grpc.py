"""The gRPC endpoint end to end: a real Serve app on the session's Ray cluster (1 front-end + 2 shards),
real gRPC on 127.0.0.1, a stock health client and a stock reflection client."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from epserve.cluster.api import inference_pb2 as pb
from epserve.cluster.api import inference_pb2_grpc as pb_grpc
from epserve.cluster.tools.client import request

from helpers import MAX_LEN, engine_greedy, tiny_server


@pytest.fixture(scope="module")
def server(ray_session, tiny_dir):
    with tiny_server(tiny_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.InferenceStub(channel)


def kv_blocks_used() -> int:
    return ray.get(ray.get_actor("epserve-frontend-0", namespace="epserve").stats.remote())["kv_blocks_used"]


def assert_blocks_freed(within_s: float = 5.0) -> None:
    """Every KV block is free within a few engine steps (an abort is queued when its stream goes away)."""
    deadline = time.monotonic() + within_s
    while kv_blocks_used() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kv_blocks_used() == 0


def finished_requests(server) -> dict[str, float]:
    """epserve:request_success_total by finish reason, as the server's /metrics says."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {s.labels["finished_reason"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "epserve:request_success" for s in family.samples if s.name.endswith("_total")}


def test_health_goes_not_serving_then_serving_and_reflection(server):
    # the app's own view, and what the standard gRPC health service told a stock client meanwhile
    assert server.health_seen[-1] == "SERVING" and "NOT_SERVING" in server.health_seen
    assert server.grpc_health_seen == ["NOT_SERVING", "SERVING"]
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
    """64 streams at once. 10 ask for LONG tokens (eos ignored) and are cancelled after 2: the engine aborts
    them (counted as aborted, not as run to their length) and their blocks are free as soon as the other 54
    are done, long before they could have run to the end; the 54 get the engine's tokens."""
    prompts = [[3 + i, 7, 11 + (i * 13) % 900] + [i % 50 + 3] * (i % 20) for i in range(64)]
    cancelled = set(range(0, 64, 7)[:10])
    completed = [i for i in range(64) if i not in cancelled]
    want = dict(zip(completed, engine_greedy(tiny_model, [prompts[i] for i in completed], 16)))
    long = MAX_LEN - 32  # room for every prompt here
    before = finished_requests(server)

    async def run():
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.InferenceStub(channel)

            async def one(i):
                call = stub.Generate(request(prompt_ids=prompts[i], max_tokens=long if i in cancelled else 16,
                                             ignore_eos=True), timeout=120)
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
    assert_blocks_freed()
    after = finished_requests(server)
    assert {r: after[r] - before[r] for r in ("abort", "length")} == {"abort": 10, "length": 54}


def sampled(ids=(5,), **sampling) -> pb.GenerateRequest:
    """A request with the given SamplingParams fields (including the ones request() has no argument for)."""
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(ids)), sampling=pb.SamplingParams(**sampling))


INT32_MAX = (1 << 31) - 1
NAN, INF = float("nan"), float("inf")
# (request, the field the message must start with, words it must hold): every field of GenerateRequest
BAD = [
    (pb.GenerateRequest(), "input", "set token_ids or text"),
    (request(prompt_ids=[]), "token_ids", "is empty"),
    (request(prompt_ids=[-1]), "token_ids", "outside the vocabulary"),
    (request(prompt_ids=[5, 1024]), "token_ids", "outside the vocabulary"),
    (request(prompt_ids=[INT32_MAX]), "token_ids", "outside the vocabulary"),
    (request(prompt_ids=[5] * MAX_LEN), "token_ids", "exceeds the context length"),
    (request(prompt_ids=[5] * (MAX_LEN + 10)), "token_ids", "exceeds the context length"),
    (request(""), "text", "is empty"),
    (request("x" * (16 * MAX_LEN + 1)), "text", "characters"),
    (request("x" * 600), "text", "exceeds the context length"),  # tokenizes to too many tokens
    (request(prompt_ids=[5], request_id="two words"), "request_id", "visible ASCII"),
    (request(prompt_ids=[5], request_id="line\nbreak"), "request_id", "visible ASCII"),
    (request(prompt_ids=[5], request_id="r" * 129), "request_id", "128"),
    (request(prompt_ids=[5], request_id="caf\u00e9"), "request_id", "visible ASCII"),
    (request(prompt_ids=[5], max_tokens=0), "sampling.max_tokens", ">= 1"),
    (request(prompt_ids=[5], max_tokens=-3), "sampling.max_tokens", ">= 1"),
    (request(prompt_ids=[5], max_tokens=MAX_LEN), "sampling.max_tokens", "no room"),
    (request(prompt_ids=[5], max_tokens=INT32_MAX), "sampling.max_tokens", "no room"),
    (request(prompt_ids=[5] * 500, max_tokens=20), "sampling.max_tokens", "exceeds the context length"),
    (request(prompt_ids=[5], temperature=-0.5), "sampling.temperature", ">= 0"),
    (sampled(temperature=NAN), "sampling.temperature", "finite"),
    (sampled(temperature=INF), "sampling.temperature", "finite"),
    (sampled(temperature=-INF), "sampling.temperature", "finite"),
    (sampled(top_p=0.0), "sampling.top_p", "(0, 1]"),
    (sampled(top_p=1.5), "sampling.top_p", "(0, 1]"),
    (sampled(top_p=-0.1), "sampling.top_p", "(0, 1]"),
    (sampled(top_p=NAN), "sampling.top_p", "(0, 1]"),
    (sampled(top_k=-1), "sampling.top_k", ">= 0"),
    (sampled(min_tokens=-1), "sampling.min_tokens", "[0, max_tokens]"),
    (sampled(max_tokens=4, min_tokens=5), "sampling.min_tokens", "[0, max_tokens]"),
    (sampled(stop_token_ids=[-4]), "sampling.stop_token_ids", "outside the vocabulary"),
    (sampled(stop_token_ids=[1024]), "sampling.stop_token_ids", "outside the vocabulary"),
    (sampled(stop_token_ids=[7] * 257), "sampling.stop_token_ids", "at most 256"),
]


def still_serving(stub) -> None:
    ok = list(stub.Generate(request(prompt_ids=[5, 6], max_tokens=2, ignore_eos=True), timeout=30))
    assert sum(len(p.token_ids) for p in ok) == 2


@pytest.mark.parametrize("req,field,words", BAD)
def test_bad_requests_are_invalid_argument_naming_the_field(stub, req, field, words):
    for call in (lambda: list(stub.Generate(req, timeout=30)), lambda: stub.Complete(req, timeout=30)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}: ") and words in err.value.details(), err.value.details()
    still_serving(stub)


def raw_generate(channel, data: bytes):
    """Generate with ``data`` as the request's wire bytes, whatever they are."""
    return channel.unary_stream("/epserve.v1.Inference/Generate")(data, timeout=30)


def test_requests_that_do_not_parse_are_invalid_argument_and_oversized_ones_refused(server, stub):
    with grpc.insecure_channel(server.grpc_target) as channel:
        for data, words in ((b"\xff\xff\xff", "not a valid message"), (b"\x1a\x02\xc3\x28", "UTF-8")):
            with pytest.raises(grpc.RpcError) as err:
                list(raw_generate(channel, data))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # over the 4 MiB receive limit
            list(stub.Generate(request("x" * (5 << 20)), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serving(stub)


FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INT32 = st.integers(-(1 << 31), INT32_MAX)
FLOAT32 = st.floats(width=32)  # NaN and infinities included


def _mixed(plausible, extreme, absent: int = 6, valid: int = 4, wild: int = 1):
    """A field's value: absent (None here), plausible or extreme, in these proportions."""
    return st.sampled_from(["absent"] * absent + ["valid"] * valid + ["wild"] * wild).flatmap(
        lambda kind: st.none() if kind == "absent" else plausible if kind == "valid" else extreme)


SAMPLING = {"max_tokens": (st.integers(1, 4), INT32), "temperature": (st.floats(0, 2), FLOAT32),
            "top_k": (st.integers(0, 50), INT32), "top_p": (st.floats(0.05, 1), FLOAT32),
            "seed": (st.integers(0, 1000), st.integers(-(1 << 63), (1 << 63) - 1)),
            "min_tokens": (st.integers(0, 1), INT32)}
IDS = st.lists(st.integers(0, 1023), min_size=1, max_size=12)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """Any GenerateRequest: each field mostly absent or plausible, sometimes extreme, so that many are valid."""
    req = pb.GenerateRequest(request_id=draw(_mixed(st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True),
                                                    st.text(max_size=140))) or "")
    kind = draw(st.sampled_from(["token_ids"] * 5 + ["text"] * 3 + ["none"]))
    if kind == "token_ids":
        req.token_ids.ids.extend(draw(_mixed(IDS, st.one_of(st.lists(INT32, max_size=12),
                                                            st.integers(0, MAX_LEN + 4).map(lambda n: [7] * n)),
                                             absent=0, valid=8)) or [])
    elif kind == "text":
        req.text = draw(st.text(max_size=64))
    s = req.sampling
    for name, (plausible, extreme) in SAMPLING.items():
        value = draw(_mixed(plausible, extreme))
        if value is not None:
            setattr(s, name, value)
    s.stop_token_ids.extend(draw(_mixed(st.lists(st.integers(0, 1023), max_size=4), st.lists(INT32, max_size=4)))
                            or [])
    s.ignore_eos, s.logprobs = draw(st.booleans()), draw(st.booleans())
    return req


def first_answer(call) -> grpc.StatusCode:
    """OK once the first piece has come (then the call is cancelled), or the error's code."""
    try:
        next(iter(call), None)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
    finally:
        call.cancel()


def test_any_request_message_gets_an_answer_or_invalid_argument(server, stub):
    @FUZZ
    @given(generate_requests())
    def answered(req):
        code = first_answer(stub.Generate(req, timeout=30))
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, req)

    answered()
    still_serving(stub)


def test_any_request_bytes_get_an_answer_or_invalid_argument(server, stub):
    with grpc.insecure_channel(server.grpc_target) as channel:
        @FUZZ
        @given(st.binary(max_size=48))
        def answered(data):
            code = first_answer(raw_generate(channel, data))
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, data)

        answered()
    still_serving(stub)


def test_deadline_is_honoured_and_frees_blocks(server, stub):
    """A deadline far shorter than the request: the client gets DEADLINE_EXCEEDED, and the server aborts the
    request (counted as aborted, not run to its length) and frees its blocks."""
    before = finished_requests(server)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request(prompt_ids=[5, 6, 7], max_tokens=500, ignore_eos=True), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_blocks_freed()
    after = finished_requests(server)
    assert after.get("abort", 0) == before.get("abort", 0) + 1
    assert after.get("length", 0) == before.get("length", 0)


def test_text_in_text_out(stub, tiny_model, tiny_dir):
    from epserve.cluster.serving.tokenizer import Tokenizer

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

    from epserve.cluster.serving.tokenizer import Tokenizer

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
