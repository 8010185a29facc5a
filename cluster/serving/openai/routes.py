"""The OpenAI-compatible HTTP API: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.

``router`` is a FastAPI ``APIRouter``; its handlers find what they serve at ``request.app.state.epserve`` (an
``OpenAIState``: the FrontendClient, the checkpoint's Tokenizer, the model name and limits; or an object with
the same names and the limits in an ``info`` dict, like serving.py's ServingState, whose ``client`` is None
while the cluster starts: 503). ``install(app, state)`` mounts it on an app; the Ray Serve ingress does the
same in its replica.

What is supported: a prompt as text, token ids, or a list of one of those; max_tokens (chat: also
max_completion_tokens; default 16 for completions, the rest of the context for chat), temperature (default 1.0
as in OpenAI), top_p, seed, stop strings (the text ends before the stop string; finish_reason "stop"),
stream with stream_options.include_usage, logprobs of the chosen tokens (completions: ``logprobs`` 0 or 1,
chat: ``logprobs: true`` with ``top_logprobs`` 0), n = 1, and vLLM's extensions top_k, min_tokens, ignore_eos,
stop_token_ids, skip_special_tokens, add_special_tokens and return_token_ids (the choice gets ``token_ids``;
always there when the model has no tokenizer). Fields that would change the result but are not implemented
(penalties, logit_bias, echo, best_of, suffix, tools, JSON response formats) are refused with a 400 naming
them; other unknown fields are ignored.

Every request gets an id (``cmpl-...`` / ``chatcmpl-...``), used as the engine's request id, returned as the
response's ``id`` and in the ``x-request-id`` header, and logged on the ``epserve.http`` logger (one line per
request). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400
``invalid_request_error`` for a bad request (``param`` names the field; the field checks are cluster/
validation.py's, shared with the gRPC API), 401 without the bearer token (when the server has one), 413 for
a body over ``max_body_bytes``, 429 when the engine's waiting queue is full, 503 while the model loads or the
server drains, 500 ``server_error`` when the engine fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from epserve.actors.engine.sampling import RequestError

from . import statuses, validation
from .security import BearerToken
from .tokenizer import ChatTemplateError, Tokenizer

if TYPE_CHECKING:
    from .frontend_client import FrontendClient

logger = logging.getLogger("epserve.http")
router = APIRouter()

MAX_BODY_BYTES = 4 << 20  # as the gRPC endpoint's message limit
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


@dataclass
class OpenAIState:
    """What the handlers serve; set as ``app.state.epserve``."""

    client: FrontendClient | None
    tokenizer: Tokenizer | None
    model_name: str
    max_model_len: int | None
    eos_token_ids: tuple[int, ...] = ()
    vocab_size: int | None = None  # for early validation; the engine validates again
    created: int = field(default_factory=lambda: int(time.time()))
    token: BearerToken | None = None  # when set, every route needs ``Authorization: Bearer <token>``
    draining: bool = False  # shutting down: new requests get 503
    stopped: str | None = None  # why the cluster gave up recovering: requests get 503 with it
    max_body_bytes: int = MAX_BODY_BYTES

    @property
    def limits(self) -> validation.Limits:
        return validation.Limits(self.vocab_size if self.vocab_size is not None else 1 << 62,
                                 self.max_model_len or 1 << 62, self.eos_token_ids)

    @classmethod
    async def create(cls, client: FrontendClient, model_name: str, checkpoint: str | None = None,
                     tokenizer: Tokenizer | None = None, **options) -> OpenAIState:
        """Fill in the limits from ``client.model_info()``; the tokenizer from ``checkpoint`` unless given;
        ``options``: token, max_body_bytes."""
        info = await client.model_info()
        if tokenizer is None and checkpoint is not None:
            tokenizer = Tokenizer.from_checkpoint(checkpoint)
        return cls(client, tokenizer, model_name, int(info["max_model_len"]), tuple(info["eos_token_ids"]),
                   int(info["vocab_size"]), **options)


def install(app: FastAPI, state: OpenAIState) -> FastAPI:
    """Mount the API on ``app`` (once) and give it ``state``."""
    if not getattr(app, "_epserve_openai_routes", False):
        app.include_router(router)
        app._epserve_openai_routes = True
    app.state.epserve = state
    return app


# ---------------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):  # noqa: A002 - OpenAI's name
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type
        self.headers = headers or {}

    @classmethod
    def of(cls, status: statuses.Status, message: str, param: str | None = None, **kw) -> APIError:
        return cls(message, param, status=status.http, code=status.code, type=status.type, **kw)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = {**self.headers, **({"x-request-id": request_id} if request_id else {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def _request_error(e: RequestError, prompt_param: str = "prompt") -> APIError:
    """400, ``param`` = the field (the engine's ``prompt`` is this endpoint's prompt_param)."""
    param = prompt_param if e.field == "prompt" else e.field
    message = str(e)
    if param != e.field and message.startswith("prompt:"):
        message = f"{param} (prompt):" + message[len("prompt:"):]
    return APIError(message, param)


def _engine_error(e: BaseException, prompt_param: str = "prompt") -> APIError:
    """An exception from the engine as an API error: a refusal (a RequestError, possibly inside a
    RayTaskError: 400; a full queue: 429; draining: 503) or the server's failure (500)."""
    cause = getattr(e, "cause", None)
    err = cause if isinstance(cause, Exception) and statuses.of(cause) else e
    status = statuses.of(err)
    if isinstance(err, RequestError):
        return _request_error(err, prompt_param)
    if status is not None:
        return APIError.of(status, str(err))
    return APIError(f"the engine failed: {type(e).__name__}: {cause or e}", status=500, type="server_error")


# ---------------------------------------------------------------------------------------------------- fields


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, name: str, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise APIError(f"{name} must be an integer, got {_shown(v)}", name)
    return v


def _float(body: dict, name: str, default=None):
    v = body.get(name)
    if v is None:
        return default
    try:
        finite = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise APIError(f"{name} must be a finite number, got {_shown(v)}", name)
    return float(v)


def _shown(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(f"{name} must be true or false, got {_shown(v)}", name)
    return v


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError("stop must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters", "stop")
    return [s for s in stop if s]


def _refuse_unsupported(body: dict, chat: bool) -> None:
    """Fields that would change the result but are not implemented: a 400 rather than a silent difference."""
    if body.get("n") not in (None, 1):
        raise APIError("n must be 1: one choice per request is supported", "n")
    if body.get("best_of") not in (None, 1):
        raise APIError("best_of must be 1", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(f"{name} is not supported (only 0)", name)
    if body.get("repetition_penalty") not in (None, 1, 1.0):
        raise APIError("repetition_penalty is not supported (only 1)", "repetition_penalty")
    if body.get("logit_bias"):
        raise APIError("logit_bias is not supported", "logit_bias")
    if chat:
        if body.get("tools"):
            raise APIError("tools are not supported", "tools")
        fmt = body.get("response_format")
        if fmt not in (None, {}) and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise APIError("response_format: only {\"type\": \"text\"} is supported", "response_format")
    else:
        if body.get("echo"):
            raise APIError("echo is not supported", "echo")
        if body.get("suffix"):
            raise APIError("suffix is not supported", "suffix")


def _sampling(body: dict, state: OpenAIState, max_tokens: int, logprobs: bool) -> dict:
    top_k = _int(body, "top_k", 0)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
        raise APIError("stop_token_ids must be a list of token ids", "stop_token_ids")
    try:
        return validation.sampling(
            state.limits, max_tokens=max_tokens, temperature=_float(body, "temperature", 1.0),
            top_p=_float(body, "top_p", 1.0), top_k=0 if top_k == -1 else top_k,  # vLLM's -1 = off
            seed=_int(body, "seed"), stop_token_ids=list(stop_ids), ignore_eos=_bool(body, "ignore_eos"),
            min_tokens=_int(body, "min_tokens", 0), logprobs=logprobs)
    except RequestError as e:
        raise APIError(str(e), e.field) from None


# ---------------------------------------------------------------------------------------------------- output


class _Output:
    """One request's output: its tokens, the text decoded so far, and stop strings.

    ``add(item)`` takes an engine step and returns the text that may be sent now: text that could still turn
    out to be the start of a stop string is held back (at most the longest stop string less one character),
    and the text ends before the first stop string found.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: list[str], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.detok = tokenizer.detokenizer(skip_special_tokens) if tokenizer else None
        self.stop = stop
        self.hold = max(map(len, stop), default=1) - 1
        self.text = ""  # decoded so far (may run past a stop string)
        self.sent = 0  # characters of ``text`` released
        self.token_ids: list[int] = []
        self.logprobs: list[float | None] = []
        self.offsets: list[int] = []  # where each token's text starts
        self.finish_reason: str | None = None
        self.done = False

    def add(self, item: dict) -> tuple[str, int]:
        """(the text to send, how many of the step's tokens it covers)."""
        ids = item["new_token_ids"]
        lps = item.get("new_logprobs") or [None] * len(ids)
        for token, lp in zip(ids, lps):
            self.offsets.append(len(self.text))
            self.token_ids.append(token)
            self.logprobs.append(lp)
            if self.detok:
                self.text += self.detok.step([token])
        if item["finished"]:
            if self.detok:
                self.text += self.detok.flush()
            self.finish_reason = item["finish_reason"]
            self.done = True
        return self._release(), len(ids)

    def _release(self) -> str:
        end = len(self.text) if self.done else max(self.sent, len(self.text) - self.hold)
        if self.stop:
            start = max(0, self.sent - self.hold)
            hits = [p for p in (self.text.find(s, start) for s in self.stop) if p >= 0]
            if hits:
                end = max(self.sent, min(hits))
                self.finish_reason, self.done = "stop", True
        piece = self.text[self.sent:end]
        self.sent = end
        return piece

    @property
    def final_text(self) -> str:
        return self.text[:self.sent]

    def token_str(self, token: int) -> str:
        return self.tokenizer.token_text(token) if self.tokenizer else f"token_id:{token}"

    def token_bytes(self, token: int) -> list[int]:
        return list(self.tokenizer.token_bytes(token)) if self.tokenizer else []

    def completion_logprobs(self, start: int, end: int) -> dict:
        return {"tokens": [self.token_str(t) for t in self.token_ids[start:end]],
                "token_logprobs": self.logprobs[start:end], "top_logprobs": None,
                "text_offset": self.offsets[start:end]}

    def chat_logprobs(self, start: int, end: int) -> dict:
        return {"content": [{"token": self.token_str(t), "logprob": lp, "bytes": self.token_bytes(t),
                             "top_logprobs": []}
                            for t, lp in zip(self.token_ids[start:end], self.logprobs[start:end])],
                "refusal": None}


@dataclass
class _Job:
    chat: bool
    request_id: str
    endpoint: str
    model: str
    prompt_ids: list[int]
    params: dict
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    skip_special_tokens: bool
    return_token_ids: bool
    created: int = field(default_factory=lambda: int(time.time()))
    t0: float = field(default_factory=time.perf_counter)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def usage(self, out: _Output) -> dict:
        n = len(out.token_ids)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n,
                "total_tokens": len(self.prompt_ids) + n}


def _log(job_or_id, endpoint: str, status: int, prompt_tokens: int, output_tokens: int, finish_reason: str | None,
         t0: float, error: str | None = None) -> None:
    rid = job_or_id.request_id if isinstance(job_or_id, _Job) else job_or_id
    logger.info("request_id=%s endpoint=%s status=%d prompt_tokens=%d output_tokens=%d finish_reason=%s "
                "seconds=%.3f%s", rid, endpoint, status, prompt_tokens, output_tokens, finish_reason,
                time.perf_counter() - t0, f" error={error!r}" if error else "")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _SSEResponse(StreamingResponse):
    """Closes the event generator when the response ends for any reason (a client that went away included),
    shielded from the cancellation, so that the engine request is aborted at once."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.move_on_after(10, shield=True):
                await self.body_iterator.aclose()


# ---------------------------------------------------------------------------------------------------- handlers


_STARTED = int(time.time())


def _state(request: Request, need_client: bool = True) -> OpenAIState:
    """The served state as an OpenAIState, once the caller has shown the bearer token (when there is one):
    401 otherwise; 503 while draining or, with ``need_client``, while the model loads. ``app.state.epserve``
    may be an OpenAIState or any object with ``model_name``, ``tokenizer``, ``client`` (None while the model
    loads) and the limits either as attributes or in an ``info`` dict (``FrontendClient.model_info()``), like
    cluster/serving.py's ServingState (``token`` and ``draining`` optional)."""
    state = getattr(request.app.state, "epserve", None)
    if state is None:
        raise APIError("the server is not set up (app.state.epserve is missing)", status=503, type="server_error")
    if not isinstance(state, OpenAIState):
        info = getattr(state, "info", None) or {}

        def pick(name):
            value = getattr(state, name, None)
            return value if value is not None else info.get(name)

        state = OpenAIState(getattr(state, "client", None), getattr(state, "tokenizer", None), state.model_name,
                            pick("max_model_len"), tuple(pick("eos_token_ids") or ()), pick("vocab_size"),
                            getattr(state, "created", _STARTED), getattr(state, "token", None),
                            bool(getattr(state, "draining", False)), getattr(state, "stopped", None))
    if state.token is not None and not state.token.accepts(request.headers.get("authorization")):
        raise APIError.of(statuses.UNAUTHENTICATED, "missing or wrong bearer token (Authorization: Bearer <token>)",
                          headers={"www-authenticate": "Bearer"})
    if state.draining and need_client:
        raise APIError.of(statuses.UNAVAILABLE, "the server is shutting down: retry elsewhere or later")
    if state.stopped and need_client:
        raise APIError(f"the cluster stopped serving: {state.stopped}", status=503, type="server_error",
                       code="cluster_stopped")
    if state.client is None and need_client:
        raise APIError("the cluster is starting or recovering: try again shortly", status=503,
                       type="server_error", code="model_not_ready")
    return state


async def _json_body(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past ``limit`` bytes (from the header, or as it streams in)."""
    too_large = APIError.of(statuses.TOO_LARGE, f"the request body is larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise too_large
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise APIError(f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    return body


def _check_model(body: dict, state: OpenAIState) -> None:
    model = body.get("model")
    if model is not None and model != state.model_name:
        raise APIError(f"the model {model!r} does not exist: this server serves {state.model_name!r}", "model",
                       code="model_not_found")


def _model_card(state: OpenAIState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "epserve",
            "max_model_len": state.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request):
    try:
        state = _state(request, need_client=False)
    except APIError as e:
        return e.response()
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    try:
        state = _state(request, need_client=False)
        if model_id != state.model_name:
            raise APIError(f"the model {model_id!r} does not exist: this server serves {state.model_name!r}",
                           "model", status=404, code="model_not_found")
    except APIError as e:
        return e.response()
    return _model_card(state)


def _completion_prompt(body: dict, state: OpenAIState) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if state.tokenizer is None and prompt:
            raise APIError("this model has no tokenizer: send the prompt as a list of token ids", "prompt")
        text = _checked(validation.text, prompt, state.limits, "prompt")
        return state.tokenizer.encode(text, add_bos=_bool(body, "add_special_tokens", True))
    if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        return _checked(validation.token_ids, prompt, state.limits, "prompt")
    if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError("batched prompts are not supported: send one prompt per request", "prompt")
    if prompt is None:
        raise APIError("prompt is required", "prompt")
    raise APIError("prompt must be a string, a list of token ids, or a list of one of those", "prompt")


def _checked(check, *args):
    """A validation.py check, its RequestError as a 400."""
    try:
        return check(*args)
    except RequestError as e:
        raise _request_error(e) from None


def _chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(f"messages[{i}] must be an object with a role", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant"):
            raise APIError(f"messages[{i}]: role {m['role']!r} is not supported (system, user, assistant)",
                           "messages")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(f"messages[{i}]: only text content parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": role, "content": _checked(validation.unicode, content, f"messages[{i}].content")})
    return out


@router.post("/v1/completions")
async def completions(request: Request):
    return await _handle(request, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _handle(request, chat=True)


async def _handle(request: Request, chat: bool) -> Response:
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    endpoint = request.url.path
    t0 = time.perf_counter()
    prompt_tokens = 0
    try:
        state = _state(request)
        body = await _json_body(request, state.max_body_bytes)
        _check_model(body, state)
        _refuse_unsupported(body, chat)
        stream = _bool(body, "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise APIError("stream_options must be an object", "stream_options")
        include_usage = stream and bool(opts.get("include_usage"))
        tok = state.tokenizer
        if chat:
            if tok is None or not tok.has_chat_template:
                raise APIError(f"the model {state.model_name!r} has no chat template: use /v1/completions",
                               "messages", code="chat_template_missing")
            try:
                text = tok.apply_chat_template(_chat_messages(body), add_generation_prompt=True)
            except ChatTemplateError as e:
                raise APIError(f"messages: {e}", "messages") from None
            prompt_ids = tok.encode(_checked(validation.text, text, state.limits, "messages"),
                                    add_bos=False)  # the template writes <bos>
            logprobs = _bool(body, "logprobs")
            if _int(body, "top_logprobs", 0):
                raise APIError("top_logprobs is not supported (only the chosen tokens' logprobs)", "top_logprobs")
            max_tokens = _int(body, "max_completion_tokens")
            name = "max_completion_tokens"
            if max_tokens is None:
                max_tokens, name = _int(body, "max_tokens"), "max_tokens"
            if max_tokens is None:
                max_tokens = (state.max_model_len or 1 << 62) - len(prompt_ids)
                if max_tokens < 1:
                    raise APIError(f"messages: the conversation ({len(prompt_ids)} tokens) fills the context "
                                   f"length {state.max_model_len}", "messages")
            elif max_tokens < 1:
                raise APIError(f"{name} must be an integer >= 1, got {max_tokens}", name)
        else:
            prompt_ids = _completion_prompt(body, state)
            lp = _int(body, "logprobs")
            if lp is not None and lp not in (0, 1):
                raise APIError("logprobs must be 0 or 1: only the chosen tokens' logprobs are available", "logprobs")
            logprobs = lp is not None
            max_tokens = _int(body, "max_tokens", 16)
        prompt_tokens = len(prompt_ids)
        job = _Job(chat, request_id, endpoint, state.model_name, prompt_ids,
                   _sampling(body, state, max_tokens, logprobs), _stop_strings(body), stream, include_usage,
                   logprobs, _bool(body, "skip_special_tokens", True),
                   _bool(body, "return_token_ids") or tok is None, t0=t0)
        out = _Output(tok, job.stop, job.skip_special_tokens)
        agen = state.client.stream(job.prompt_ids, job.params, request_id)
        try:
            first = await agen.__anext__()  # the engine validates the request when it is added
        except asyncio.CancelledError:  # the client went away (Serve cancels the request)
            _log(request_id, endpoint, 499, prompt_tokens, 0, "abort", t0, "the client went away")
            raise
        except StopAsyncIteration:
            raise APIError("the engine ended the request without output", status=500, type="server_error") from None
        except Exception as e:  # noqa: BLE001 - a refused request, or an engine failure
            await agen.aclose()
            raise _engine_error(e, "messages" if chat else "prompt") from None
    except APIError as e:
        _log(request_id, endpoint, e.status, prompt_tokens, 0, "error", t0, e.message)
        return e.response(request_id)
    headers = {"x-request-id": request_id}
    if stream:
        return _SSEResponse(_events(job, out, agen, first), media_type="text/event-stream",
                            headers={**headers, "cache-control": "no-cache"})
    return await _complete(request, job, out, agen, first, headers)


async def _complete(request: Request, job: _Job, out: _Output, agen: AsyncIterator[dict], first: dict,
                    headers: dict) -> Response:
    status, error = 200, None
    try:
        out.add(first)
        n = 0
        while not out.done:
            item = await agen.__anext__()
            out.add(item)
            n += 1
            if n % 8 == 0 and await request.is_disconnected():
                status, error = 499, "the client went away"
                return Response(status_code=499)
    except StopAsyncIteration:
        pass
    except Exception as e:  # noqa: BLE001 - the engine failed mid-request
        err = _engine_error(e)
        status, error = err.status, err.message
        return err.response(job.request_id)
    finally:
        with anyio.move_on_after(10, shield=True):
            await agen.aclose()  # leaves the stream early on a stop string: the engine request is aborted
        if not out.done and status == 200:  # cancelled: the client went away
            status, error = 499, "the client went away"
        _log(job, job.endpoint, status, len(job.prompt_ids), len(out.token_ids),
             out.finish_reason if out.done else "error" if status >= 500 else "abort", job.t0, error)
    choice: dict[str, Any] = {"index": 0}
    if job.chat:
        choice["message"] = {"role": "assistant", "content": out.final_text, "refusal": None}
        choice["logprobs"] = out.chat_logprobs(0, len(out.token_ids)) if job.logprobs else None
    else:
        choice["text"] = out.final_text
        choice["logprobs"] = out.completion_logprobs(0, len(out.token_ids)) if job.logprobs else None
    choice["finish_reason"] = out.finish_reason
    if job.return_token_ids:
        choice["token_ids"] = list(out.token_ids)
    body = {"id": job.request_id, "object": job.object, "created": job.created, "model": job.model,
            "choices": [choice], "usage": job.usage(out)}
    if job.chat:
        body["system_fingerprint"] = None
    return JSONResponse(body, headers=headers)


async def _events(job: _Job, out: _Output, agen: AsyncIterator[dict], first: dict) -> AsyncIterator[str]:
    """The server-sent events of a streamed request, ending with ``data: [DONE]``."""
    obj = "chat.completion.chunk" if job.chat else "text_completion"
    status, error = 200, None

    def chunk(choices: list[dict], usage: Any = None) -> str:
        c = {"id": job.request_id, "object": obj, "created": job.created, "model": job.model, "choices": choices}
        if job.chat:
            c["system_fingerprint"] = None
        if job.include_usage:
            c["usage"] = usage
        return _sse(c)

    def choice(text: str, start: int, end: int, finish: str | None) -> dict:
        c: dict[str, Any] = {"index": 0}
        if job.chat:
            c["delta"] = {"content": text} if text else {}
            c["logprobs"] = out.chat_logprobs(start, end) if job.logprobs and end > start else None
        else:
            c["text"] = text
            c["logprobs"] = out.completion_logprobs(start, end) if job.logprobs and end > start else None
        c["finish_reason"] = finish
        if job.return_token_ids:
            c["token_ids"] = out.token_ids[start:end]
        return c

    try:
        if job.chat:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        item = first
        while True:
            start = len(out.token_ids)
            text, _ = out.add(item)
            end = len(out.token_ids)
            if out.done and job.chat:
                if text or (job.logprobs and end > start):
                    yield chunk([choice(text, start, end, None)])
                yield chunk([choice("", end, end, out.finish_reason)])
            elif out.done:
                yield chunk([choice(text, start, end, out.finish_reason)])
            elif text or (job.logprobs and end > start) or (job.return_token_ids and end > start):
                yield chunk([choice(text, start, end, None)])
            if out.done:
                break
            try:
                item = await agen.__anext__()
            except StopAsyncIteration:
                break
        if job.include_usage:
            yield chunk([], job.usage(out))
    except Exception as e:  # noqa: BLE001 - the engine failed mid-stream: say so in the stream
        err = _engine_error(e)
        status, error = err.status, err.message
        yield _sse(err.body())
    finally:
        with anyio.move_on_after(10, shield=True):
            await agen.aclose()  # a stop string or a client that went away: the engine request is aborted
        reason = out.finish_reason if out.done else ("error" if error else "abort")
        _log(job, job.endpoint, status if out.done or error else 499, len(job.prompt_ids), len(out.token_ids),
             reason, job.t0, error or (None if out.done else "the client went away"))
    yield "data: [DONE]\n\n"
