"""The OpenAI-compatible HTTP API: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.

``router`` is a FastAPI ``APIRouter``; its handlers serve the ``ServingState`` at ``request.app.state.epserve``
(the Serve ingress sets it; ``install(app, state)`` does the same on any app). Its ``client`` is None while the
cluster starts or recovers: 503.

A request body is read (at most ``MAX_MESSAGE_BYTES``: 413), validated as its pydantic model (requests.py),
its prompt tokenized and checked against the model (validation.py, shared with gRPC), and streamed from the
engine through a ``TextStream`` (text, stop strings; shared with gRPC) into the response (responses.py).
Every request gets an id (``cmpl-...`` / ``chatcmpl-...``), used as the engine's request id, returned as the
response's ``id`` and in the ``x-request-id`` header, and logged on the ``epserve.http`` logger (one line per
request). Every error is written in OpenAI's shape by one handler (errors.py): 400 for a bad request
(``param`` names the field), 401 without the bearer token (when the server has one), 413, 429 when the
engine's waiting queue is full, 503 while the model loads or the server drains, 500 when the engine fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import AsyncIterator

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from epserve.actors.engine.engine import RequestOutput

from .. import statuses, validation
from ..state import ServingState
from ..text_stream import TextStream
from ..tokenizer import ChatTemplateError
from .errors import APIError, api_error
from .requests import ChatRequest, CompletionRequest
from .responses import Answer, SSEResponse

logger = logging.getLogger("epserve.http")
router = APIRouter()


def install(app: FastAPI, state: ServingState) -> FastAPI:
    """Mount the API on ``app`` (once) and give it ``state``."""
    if not getattr(app, "_epserve_openai_routes", False):
        app.include_router(router)
        app._epserve_openai_routes = True
    app.state.epserve = state
    return app


def _state(request: Request, inference: bool = True) -> ServingState:
    """The served state, once the caller has shown the bearer token (when there is one): 401 otherwise; for
    ``inference``, 503 while the server drains, the cluster starts or recovers, or after it stopped."""
    state = getattr(request.app.state, "epserve", None)
    if state is None:
        raise APIError("the server is not set up (app.state.epserve is missing)", status=503, type="server_error")
    if state.token is not None and not state.token.accepts(request.headers.get("authorization")):
        raise APIError.of(statuses.UNAUTHENTICATED, "missing or wrong bearer token (Authorization: Bearer <token>)",
                          headers={"www-authenticate": "Bearer"})
    refusal = state.refusal() if inference else None
    if refusal is not None:
        raise APIError.of(*refusal)
    return state


# ------------------------------------------------------------------------------------------------------ models


def _model_card(state: ServingState) -> dict:
    """OpenAI's model object, with every fact of the served model (ModelInfo) once the cluster has started."""
    card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "epserve"}
    return {**card, **state.info.to_dict()} if state.info is not None else card


@router.get("/v1/models")
async def list_models(request: Request):
    try:
        state = _state(request, inference=False)
    except APIError as e:
        return e.response()
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    try:
        state = _state(request, inference=False)
        if model_id != state.model_name:
            raise APIError(f"the model {model_id!r} does not exist: this server serves {state.model_name!r}",
                           "model", status=404, code="model_not_found")
    except APIError as e:
        return e.response()
    return _model_card(state)


# ------------------------------------------------------------------------------------------------------ requests


async def _json_body(request: Request) -> dict:
    """The body as a JSON object; 413 past MAX_MESSAGE_BYTES (from the header, or as it streams in)."""
    limit = validation.MAX_MESSAGE_BYTES
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


def _check_model(body: dict, state: ServingState) -> None:
    model = body.get("model")
    if model is not None and model != state.model_name:
        raise APIError(f"the model {model!r} does not exist: this server serves {state.model_name!r}", "model",
                       code="model_not_found")


def _completion_prompt(req: CompletionRequest, state: ServingState) -> tuple[list[int], int, bool]:
    """(prompt token ids, max_tokens, logprobs) of a completion request."""
    if isinstance(req.prompt, str):
        if state.tokenizer is None and req.prompt:
            raise APIError("this model has no tokenizer: send the prompt as a list of token ids", "prompt")
        ids = state.tokenizer.encode(validation.text(req.prompt, state.info), req.add_special_tokens)
    else:
        ids = validation.token_ids(req.prompt, state.info)
    return ids, 16 if req.max_tokens is None else req.max_tokens, req.logprobs is not None


def _chat_prompt(req: ChatRequest, state: ServingState) -> tuple[list[int], int, bool]:
    """(prompt token ids, max_tokens, logprobs) of a chat request: by default the rest of the context."""
    tok, limit = state.tokenizer, state.info.max_model_len
    if tok is None or not tok.has_chat_template:
        raise APIError(f"the model {state.model_name!r} has no chat template: use /v1/completions", "messages",
                       code="chat_template_missing")
    try:
        text = tok.apply_chat_template(req.messages, add_generation_prompt=True)
    except ChatTemplateError as e:
        raise APIError(f"messages: {e}", "messages") from None
    ids = tok.encode(validation.text(text, state.info, "messages"), add_special_tokens=False)  # in the template
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(req, name)
    if max_tokens is None:
        max_tokens = limit - len(ids)
        if max_tokens < 1:
            raise APIError(f"messages: the conversation ({len(ids)} tokens) fills the context length {limit}",
                           "messages")
    elif max_tokens < 1:
        raise APIError(f"{name} must be an integer >= 1, got {max_tokens}", name)
    return ids, max_tokens, req.logprobs


@router.post("/v1/completions")
async def completions(request: Request):
    return await _handle(request, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _handle(request, chat=True)


async def _handle(request: Request, chat: bool) -> Response:
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    t0, prompt_tokens = time.perf_counter(), 0

    def log(status: int, output_tokens: int, finish_reason: str | None, error: str | None = None) -> None:
        _log(request_id, request.url.path, status, prompt_tokens, output_tokens, finish_reason, error, t0)

    try:
        state = _state(request)
        body = await _json_body(request)
        _check_model(body, state)
        req = (ChatRequest if chat else CompletionRequest).model_validate(body)
        prompt_ids, max_tokens, logprobs = (_chat_prompt if chat else _completion_prompt)(req, state)
        prompt_tokens = len(prompt_ids)
        params = validation.sampling(state.info, **req.sampling_fields(max_tokens, logprobs))
        text = TextStream(state.tokenizer, req.stop, req.skip_special_tokens)
        answer = Answer(request_id, chat, state.model_name, prompt_tokens, text, state.tokenizer, logprobs,
                        req.return_token_ids or state.tokenizer is None, req.include_usage)
        outputs = state.client.stream(prompt_ids, params, request_id)
        first = await outputs.__anext__()  # the engine checks the request when it is added
    except asyncio.CancelledError:  # the client went away (Serve cancels the request)
        log(499, 0, "abort", "the client went away")
        raise
    except Exception as e:  # noqa: BLE001 - a refused request (or one the engine ended at once)
        err = api_error(e, "messages" if chat else "prompt")
        log(err.status, 0, "error", err.message)
        return err.response(request_id)
    headers = {"x-request-id": request_id}
    if req.stream:
        return SSEResponse(_events(answer, outputs, first, log), media_type="text/event-stream",
                           headers={**headers, "cache-control": "no-cache"})
    return await _complete(request, answer, outputs, first, log, headers)


async def _complete(request: Request, answer: Answer, outputs: AsyncIterator[RequestOutput], first: RequestOutput,
                    log, headers: dict) -> Response:
    status, error, text = 200, None, answer.text
    try:
        text.add(first)
        n = 0
        while not text.done:
            text.add(await outputs.__anext__())
            n += 1
            if n % 8 == 0 and await request.is_disconnected():
                status, error = 499, "the client went away"
                return Response(status_code=499)
    except StopAsyncIteration:
        pass
    except Exception as e:  # noqa: BLE001 - the engine failed mid-request
        err = api_error(e)
        status, error = err.status, err.message
        return err.response(answer.request_id)
    finally:
        with anyio.move_on_after(10, shield=True):
            await outputs.aclose()  # left early (a stop string, a client gone): the engine request is aborted
        if not text.done and status == 200:  # cancelled: the client went away
            status, error = 499, "the client went away"
        log(status, len(text.token_ids), text.finish_reason if text.done else "error" if status >= 500 else "abort",
            error)
    return JSONResponse(answer.whole(), headers=headers)


async def _events(answer: Answer, outputs: AsyncIterator[RequestOutput], first: RequestOutput,
                  log) -> AsyncIterator[str]:
    """The server-sent events of a streamed request, ending with ``data: [DONE]``."""
    text, error = answer.text, None
    try:
        if answer.chat:
            yield answer.role_chunk()
        out = first
        while True:
            start = len(text.token_ids)
            piece = text.add(out)
            end = len(text.token_ids)
            if text.done and answer.chat:  # chat ends with a chunk of its own: an empty delta and the reason
                if piece or (answer.logprobs and end > start):
                    yield answer.chunk([answer.choice(piece, start, end, None, streamed=True)])
                yield answer.chunk([answer.choice("", end, end, text.finish_reason, streamed=True)])
            elif text.done:
                yield answer.chunk([answer.choice(piece, start, end, text.finish_reason, streamed=True)])
            elif piece or ((answer.logprobs or answer.return_token_ids) and end > start):
                yield answer.chunk([answer.choice(piece, start, end, None, streamed=True)])
            if text.done:
                break
            try:
                out = await outputs.__anext__()
            except StopAsyncIteration:
                break
        if answer.include_usage:
            yield answer.chunk([], answer.usage())
    except Exception as e:  # noqa: BLE001 - the engine failed mid-stream: say so in the stream
        err = api_error(e)
        error = err
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        with anyio.move_on_after(10, shield=True):
            await outputs.aclose()  # a stop string or a client that went away: the engine request is aborted
        reason = text.finish_reason if text.done else ("error" if error else "abort")
        status = error.status if error else 200 if text.done else 499
        log(status, len(text.token_ids), reason,
            error.message if error else (None if text.done else "the client went away"))
    yield "data: [DONE]\n\n"


def _log(request_id: str, endpoint: str, status: int, prompt_tokens: int, output_tokens: int,
         finish_reason: str | None, error: str | None, t0: float) -> None:
    logger.info("request_id=%s endpoint=%s status=%d prompt_tokens=%d output_tokens=%d finish_reason=%s "
                "seconds=%.3f%s", request_id, endpoint, status, prompt_tokens, output_tokens, finish_reason,
                time.perf_counter() - t0, f" error={error!r}" if error else "")
