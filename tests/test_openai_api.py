"""The OpenAI-compatible HTTP API, end to end with real components: the tiny checkpoint (with its built-in
tokenizer), an in-process Frontend (no Ray), the router on a FastAPI app served by uvicorn on 127.0.0.1, driven
by the official ``openai`` client (and plain HTTP for the error cases). Every output is checked against the
engine's own greedy tokens, decoded with the tokenizer."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import logging
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.sampling import SamplingParams
from epserve.cluster.serving import validation
from epserve.cluster.serving.openai import install, router, routes
from epserve.cluster.serving.state import ServingState
from epserve.cluster.serving.tokenizer import Tokenizer

from helpers import InProcessServer, spanning_stop, wait_idle

MODEL = "epserve-tiny"
# prefix caching off: every request is computed from scratch, exactly as the reference engine computes it
ENGINE = dict(max_model_len=512, kv_cache_bytes=32 << 20, enable_prefix_caching=False)
PROMPT = "The quick brown fox jumps over the lazy dog."
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about foxes."}]
CHAT_EOS = [{"role": "user", "content": "words here to vary"}]  # greedy output ends with <end_of_turn> early


@pytest.fixture(scope="module")
def server(tiny_dir):
    s = InProcessServer(tiny_dir, MODEL, ENGINE)
    yield s
    s.stop()
    assert not s.thread.is_alive()


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The engine's own output for a prompt: (token ids, finish reason, logprobs)."""
    engine = LLMEngine(tiny_model, EngineConfig(**ENGINE))

    def run(prompt_ids, **params):
        (c,) = engine.generate([prompt_ids], SamplingParams(temperature=0.0, **params))
        return c.token_ids, c.finish_reason, c.logprobs

    return run


@pytest.fixture
def http_log(caplog):
    caplog.set_level(logging.INFO, logger="epserve.http")
    return caplog


def _log_line(caplog, request_id: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [r.getMessage() for r in caplog.records if r.name == "epserve.http" and request_id in r.getMessage()]
        if lines:
            assert len(lines) == 1
            return lines[0]
        time.sleep(0.02)
    raise AssertionError(f"no log line for {request_id}")


# --------------------------------------------------------------------------------------------- completions


def test_models(server, tiny_dir):
    info = asyncio.run(server.state.client.model_info())
    assert (info.max_model_len, info.vocab_size, info.eos_token_ids) == (512, 1024, (1, 106))
    assert Tokenizer.from_checkpoint(tiny_dir).has_chat_template
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    # the card carries every fact of the served model: a client learns the vocabulary and context here
    card = models.data[0].model_dump()
    assert {k: card[k] for k in info.to_dict()} == {**info.to_dict(), "eos_token_ids": [1, 106]}
    assert server.client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("other")


def test_completion_matches_the_engine(server, reference, http_log):
    ids = server.tokenizer.encode(PROMPT)
    ref, reason, _ = reference(ids, max_tokens=20, ignore_eos=True)
    r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    (choice,) = r.choices
    assert choice.text == server.tokenizer.decode(ref) and choice.finish_reason == reason == "length"
    assert choice.token_ids == ref
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 20, len(ids) + 20)
    line = _log_line(http_log, r.id)
    assert f"prompt_tokens={len(ids)} output_tokens=20 finish_reason=length" in line and "status=200" in line
    # the same prompt as token ids, and as a list of one prompt
    for prompt in (ids, [ids], [PROMPT]):
        again = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                                 extra_body={"ignore_eos": True})
        assert again.choices[0].text == choice.text and again.id != r.id


def test_streamed_completion_with_usage(server, reference):
    ids = server.tokenizer.encode(PROMPT)
    ref, _, _ = reference(ids, max_tokens=16, ignore_eos=True)
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                                   stream=True, stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == server.tokenizer.decode(ref)
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1]) and len(text_chunks) > 3
    assert all(c.usage is None for c in text_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 16
    assert usage_chunk.usage.prompt_tokens == len(ids)


def test_server_sent_events_format(server):
    """OpenAI's wire format: ``data: {json}`` events separated by blank lines, ending with ``data: [DONE]``."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 5,
                                                        "temperature": 0, "stream": True, "ignore_eos": True}),
                 {"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    raw = r.read().decode()
    conn.close()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    bodies = [json.loads(e[6:]) for e in events[:-1]]
    assert {b["id"] for b in bodies} == {r.getheader("x-request-id")}
    assert all(b["object"] == "text_completion" and set(b["choices"][0]) == {"index", "text", "logprobs",
                                                                              "finish_reason"} for b in bodies)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text_and_ends_the_request(server, reference, stream, http_log):
    ids = server.tokenizer.encode(PROMPT)
    ref, _, _ = reference(ids, max_tokens=24, ignore_eos=True)
    d = server.tokenizer.detokenizer()
    pieces = [d.step([t]) for t in ref]
    stop, k = spanning_stop(pieces)
    text = server.tokenizer.decode(ref)
    # the engine stops at the token whose text completes the stop string
    needed = next(i + 1 for i in range(len(pieces)) if len("".join(pieces[:i + 1])) >= k + len(stop))
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=["never there", stop],
                extra_body={"ignore_eos": True})
    if stream:
        chunks = list(server.client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        rid = chunks[0].id
        assert "".join(c.choices[0].text for c in chunks[:-1]) == text[:k]
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].usage.completion_tokens == needed
    else:
        r = server.client.completions.create(**args)
        rid = r.id
        assert r.choices[0].text == text[:k] and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == needed
    assert needed < 24
    assert f"output_tokens={needed} finish_reason=stop" in _log_line(http_log, rid)
    wait_idle(server)  # the request was aborted in the engine


def test_logprobs(server, reference):
    ids = server.tokenizer.encode(PROMPT)
    ref, _, ref_lp = reference(ids, max_tokens=8, ignore_eos=True, logprobs=True)
    r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1,
                                         extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [server.tokenizer.token_text(t) for t in ref]
    assert lp.token_logprobs == pytest.approx(ref_lp, abs=1e-4)
    assert all(v <= 0 for v in lp.token_logprobs) and len(lp.text_offset) == 8
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                                   logprobs=0, stream=True, extra_body={"ignore_eos": True}))
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(ref_lp, abs=1e-4)


# --------------------------------------------------------------------------------------------- chat


def _chat_ids(server, messages):
    return server.tokenizer.encode(server.tokenizer.apply_chat_template(messages), add_special_tokens=False)


def test_chat_completion_matches_the_engine(server, reference):
    ids = _chat_ids(server, CHAT)
    ref, reason, ref_lp = reference(ids, max_tokens=12, logprobs=True)
    r = server.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                              logprobs=True)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == server.tokenizer.decode(ref)
    assert choice.finish_reason == reason and r.usage.prompt_tokens == len(ids)
    assert [c.logprob for c in choice.logprobs.content] == pytest.approx(ref_lp, abs=1e-4)
    assert [bytes(c.bytes) for c in choice.logprobs.content] == [server.tokenizer.token_bytes(t) for t in ref]
    # streamed: a role chunk, content deltas, a finish chunk with an empty delta, then usage
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=12,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == choice.message.content
    assert chunks[-2].choices[0].finish_reason == reason and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].usage.completion_tokens == len(ref) and chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_eos_ignore_eos_and_min_tokens(server, reference):
    ids = _chat_ids(server, CHAT_EOS)
    ref, reason, _ = reference(ids, max_tokens=40)
    assert reason == "stop" and ref[-1] in (1, 106) and len(ref) < 30, "pick another prompt that ends early"
    r = server.client.chat.completions.create(model=MODEL, messages=CHAT_EOS, max_tokens=40, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(ref)
    assert r.choices[0].message.content == server.tokenizer.decode(ref)  # the end token is not text
    for extra, max_tokens in (({"ignore_eos": True}, 30), ({"min_tokens": len(ref) + 2}, len(ref) + 4)):
        ref2, reason2, _ = reference(ids, max_tokens=max_tokens, **extra)
        r = server.client.chat.completions.create(model=MODEL, messages=CHAT_EOS, max_tokens=max_tokens,
                                                  temperature=0, extra_body=extra)
        assert r.choices[0].message.content == server.tokenizer.decode(ref2), extra
        assert r.choices[0].finish_reason == reason2 and r.usage.completion_tokens == len(ref2) > len(ref)


def test_chat_stop_string_streamed(server, reference):
    ids = _chat_ids(server, CHAT)
    ref, _, _ = reference(ids, max_tokens=16, ignore_eos=True)
    d = server.tokenizer.detokenizer()
    stop, k = spanning_stop([d.step([t]) for t in ref])
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                                        stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == server.tokenizer.decode(ref)[:k]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_without_a_chat_template_or_tokenizer(server, reference):
    state = server.state
    try:
        server.app.state.epserve = dataclasses.replace(state, tokenizer=None)
        status, body = server.post("/v1/chat/completions", {"model": MODEL, "messages": CHAT})
        assert status == 400 and "no chat template" in body["error"]["message"]
        status, body = server.post("/v1/completions", {"model": MODEL, "prompt": "hello"})
        assert status == 400 and "token ids" in body["error"]["message"] and body["error"]["param"] == "prompt"
        ids = server.tokenizer.encode(PROMPT)
        ref, _, _ = reference(ids, max_tokens=6, ignore_eos=True)
        status, body = server.post("/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 6,
                                                       "temperature": 0, "ignore_eos": True})
        assert status == 200 and body["choices"][0]["token_ids"] == ref and body["choices"][0]["text"] == ""
    finally:
        server.app.state.epserve = state


def test_a_server_still_starting_answers_503_but_names_its_model(server):
    """The Serve ingress shares one ServingState with gRPC: no client and no ModelInfo while the cluster
    starts (503), then the same state serves once they are set."""
    state = server.state
    loading = ServingState(model_name=MODEL, tokenizer=server.tokenizer)
    try:
        server.app.state.epserve = loading
        status, body = server.post("/v1/completions", {"model": MODEL, "prompt": "hi"})
        assert status == 503 and body["error"]["code"] == "model_not_ready"
        assert [m.id for m in server.client.models.list().data] == [MODEL]
        loading.client, loading.info = state.client, server.frontend.model_info()
        r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3
        status, body = server.post("/v1/completions", {"model": MODEL, "prompt": [5] * 600})
        assert status == 400 and "context length 512" in body["error"]["message"]
        status, body = server.post("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] <= 2
    finally:
        server.app.state.epserve = state
    install(server.app, state)  # a second install does not mount the routes twice
    mounted = [r for r in server.app.router.routes if getattr(r, "original_router", r) is router
               or getattr(r, "endpoint", None) is routes.completions]
    assert len(mounted) == 1


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {"prompt": ""}, "prompt", "empty"),
    ("/v1/completions", {"prompt": []}, "prompt", "empty"),
    ("/v1/completions", {"prompt": [5, 99999]}, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": [5, 99999], "stream": True}, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": [5] * 600}, "prompt", "context length 512"),
    ("/v1/completions", {"prompt": [5] * 500, "max_tokens": 100}, "max_tokens", "context length 512"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, "model", "gpt-4"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n", "n must be 1"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ("/v1/completions", {"prompt": {"x": 1}}, "prompt", "prompt must be"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "hi", "stop": 3}, "stop", "stop"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 50, "max_tokens": 5}, "min_tokens", "min_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 2}, "messages", "alternate"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "a"}]}, "messages", "tool"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 600}]}, "messages", "context"),
    # every other field, and values that once reached the engine or the tokenizer in a shape they refuse
    ("/v1/completions", {"prompt": "hi", "temperature": 10 ** 400}, "temperature", "finite"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature", "finite"),
    ("/v1/completions", {"prompt": "hi", "top_p": float("nan")}, "top_p", "finite"),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, "top_k", ">= 0"),
    ("/v1/completions", {"prompt": "hi", "seed": 1 << 70}, "seed", "2**64"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1.5}, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 512}, "max_tokens", "no room"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a"] * 17}, "stop", "at most 16"),
    ("/v1/completions", {"prompt": "hi", "stop": "s" * 257}, "stop", "at most 256 characters"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": "7"}, "stop_token_ids", "list of token ids"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [7] * 257}, "stop_token_ids", "at most 256"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [1024]}, "stop_token_ids", "outside the vocabulary"),
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt", "not valid Unicode"),
    ("/v1/completions", {"prompt": "x" * (16 * 512 + 1)}, "prompt", "characters"),
    ("/v1/completions", {"prompt": [5, True]}, "prompt", "prompt must be"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream", "true or false"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": "usage"}, "stream_options", "object"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 5}, "logprobs", "0 or 1"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": "true"}, "ignore_eos", "true or false"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, "echo", "not supported"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1}}, "logit_bias", "not supported"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"content": "a"}]}, "messages", "with a role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "text content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udfff"}]}, "messages[0].content",
     "not valid Unicode"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs", "not supported"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format",
     "text"),
])
def test_bad_requests_are_400_in_openai_shape(server, path, body, param, words, http_log):
    status, resp = server.post(path, {"model": MODEL, **body} if "model" not in body else body)
    assert status == 400, resp
    err = resp["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and words in err["message"] and param in err["message"], err
    assert any("status=400" in r.getMessage() and "finish_reason=error" in r.getMessage() for r in http_log.records)
    _still_serving(server)


def _still_serving(server) -> None:
    status, body = server.post("/v1/completions", {"model": MODEL, "prompt": [5, 6], "max_tokens": 2,
                                                   "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 2, body


def test_malformed_json_and_the_openai_client_errors(server):
    status, resp = server.post("/v1/completions", b'{"model": "x", "prompt": ')
    assert status == 400 and "not valid JSON" in resp["error"]["message"]
    status, resp = server.post("/v1/chat/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in resp["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="nope", prompt="hi")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="top_p"):
        server.client.chat.completions.create(model=MODEL, messages=CHAT, top_p=2.0, stream=True)


def test_client_disconnect_mid_stream_aborts_the_request(server, http_log):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 480,
                                                        "temperature": 0, "stream": True, "ignore_eos": True}),
                 {"content-type": "application/json"})
    r = conn.getresponse()
    rid = r.getheader("x-request-id")
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    line = _log_line(http_log, rid)  # 480 tokens would take several seconds; the abort comes at once
    assert "finish_reason=abort" in line and "status=499" in line
    assert int(line.split("output_tokens=")[1].split()[0]) < 480
    wait_idle(server)
    assert server.frontend.engine.kv_usage == 0.0


def test_oversized_and_deeply_nested_bodies(server):
    limit = validation.MAX_MESSAGE_BYTES
    # a declared length over the limit: refused before any of the body is read (so none is sent here)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {limit + 1}\r\n\r\n".encode())
        head = sock.recv(65536).decode()
    assert head.startswith("HTTP/1.1 413") and "request_too_large" in head, head[:300]
    # no declared length (chunked): counted as it arrives, refused once past the limit
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    chunks = [b"[" * (1 << 20)] * (limit >> 20) + [b"["]
    conn.request("POST", "/v1/completions", iter(chunks), {"content-type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    status, resp = server.post("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert status == 400 and "not valid JSON" in resp["error"]["message"]
    _still_serving(server)


def test_bearer_token_and_draining(server):
    from epserve.cluster.serving.security import BearerToken

    state = server.state
    body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 2}
    try:
        server.app.state.epserve = dataclasses.replace(state, token=BearerToken("s3cret"))
        for path, payload in (("/v1/completions", body), ("/v1/models", None)):
            req = urllib.request.Request(server.base + path, data=payload and json.dumps(payload).encode(),
                                         headers={"content-type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 401 and e.value.headers["www-authenticate"] == "Bearer"
        authed = openai.OpenAI(base_url=server.base + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert authed.completions.create(**body).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            server.client.completions.create(**body)  # api_key "unused"
        server.app.state.epserve = dataclasses.replace(state, draining=True)
        status, resp = server.post("/v1/completions", body)
        assert status == 503 and "shutting down" in resp["error"]["message"]
        assert [m.id for m in server.client.models.list().data] == [MODEL]  # still describes the model
    finally:
        server.app.state.epserve = state
    _still_serving(server)


# --------------------------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3), max_leaves=6)


def _mixed(plausible, absent: int, valid: int, anything: int = 1):
    """A field's value: absent (None here), plausible, or any JSON at all, in these proportions."""
    return st.sampled_from(["absent"] * absent + ["valid"] * valid + ["any"] * anything).flatmap(
        lambda kind: st.none() if kind == "absent" else plausible if kind == "valid" else JSON)


COMMON = {"model": st.just(MODEL), "temperature": st.floats(0, 2),
          "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50), "seed": st.integers(-(1 << 63), 1 << 63),
          "stop": st.lists(st.text(max_size=3), max_size=3), "stop_token_ids": st.lists(st.integers(0, 1023),
                                                                                        max_size=3),
          "min_tokens": st.integers(0, 1), "ignore_eos": st.booleans(), "stream": st.booleans(),
          "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "n": st.just(1),
          "skip_special_tokens": st.booleans(), "return_token_ids": st.booleans()}
PROMPTS = st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(0, 1023), min_size=1, max_size=8))
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                           "content": st.text(max_size=30)}), min_size=1, max_size=3)


def _bodies(required: dict, optional: dict):
    """Bodies whose every field is mostly absent or plausible, sometimes anything: many are valid. The
    length is nearly always there and small: a default one would take seconds (chat: the whole context)."""
    fields = {**{k: _mixed(v, 1, 8) for k, v in required.items()}, "max_tokens": _mixed(st.integers(1, 4), 0, 9),
              **{k: _mixed(v, 6, 4) for k, v in {**COMMON, **optional}.items()}}
    return st.fixed_dictionaries(fields).map(lambda d: {k: v for k, v in d.items() if v is not None})


@pytest.mark.parametrize("path, required, optional", [
    ("/v1/completions", {"prompt": PROMPTS}, {"logprobs": st.integers(0, 1), "echo": st.just(False)}),
    ("/v1/chat/completions", {"messages": MESSAGES}, {"logprobs": st.booleans()}),
])
def test_any_json_body_gets_an_answer_or_a_400(server, path, required, optional):
    @FUZZ
    @given(st.one_of(_bodies(required, optional), JSON))
    def answered(body):
        status, resp = server.post(path, json.dumps(body).encode()) if not isinstance(body, dict) or \
            not body.get("stream") else _streamed(server, path, body)
        assert status in (200, 400), (status, resp, body)
        if status == 400:
            assert resp["error"]["type"] == "invalid_request_error" and resp["error"]["message"]

    answered()
    wait_idle(server)
    _still_serving(server)


def _streamed(server, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if r.status != 200 else {"events": raw.count(b"data: ")}
    finally:
        conn.close()
