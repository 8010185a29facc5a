"""The gRPC endpoint: ``epserve.v1.Inference`` on a grpc.aio server, with the standard health service and
server reflection.

It runs inside the Serve ingress replica rather than behind Serve's gRPC proxy: measured on a 2-core machine
a grpc.aio server in a replica answers a unary call in 2.5-6 ms and supports health and reflection
natively, while Serve's proxy costs 13-15 ms per call and needs extra work for standard health checks
(docs/grpc.md has the numbers and the command).

Every request is checked field by field (validation.py, shared with the OpenAI API) before it reaches the
engine: INVALID_ARGUMENT with a message that starts with the field (``sampling.top_p: ...``), also for a
request that does not parse. Refusals keep their meaning (statuses.py): RESOURCE_EXHAUSTED when the engine's
waiting queue is full, UNAVAILABLE while starting, recovering or draining. The text is decoded and cut at stop
strings as the OpenAI API does it (text_stream.py). Optionally the port speaks TLS only, and every call but
health checks needs the bearer token (``Guard``; security.py).
"""

from __future__ import annotations

import logging
import time
from contextlib import aclosing

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epserve.actors.engine.sampling import RequestError, SamplingParams

from ..api import inference_pb2 as pb
from ..api import inference_pb2_grpc as pb_grpc
from . import statuses, validation
from .security import BearerToken, TLSFiles
from .state import ServingState, new_request_id
from .text_stream import TextStream

SERVICE = "epserve.v1.Inference"
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "seed", "min_tokens")
log = logging.getLogger("epserve.grpc")


def sampling_fields(s: pb.SamplingParams) -> dict:
    """The engine's SamplingParams fields from the message (unset fields keep the engine's defaults)."""
    out = {name: getattr(s, name) for name in OPTIONAL_SAMPLING if s.HasField(name)}
    out.update(stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos, logprobs=s.logprobs)
    return out


def field_names(request: pb.GenerateRequest) -> dict[str, str]:
    """The engine's field names -> the message's (the prompt is whichever input is set)."""
    sampling = {f: f"sampling.{f}" for f in OPTIONAL_SAMPLING + ("stop_token_ids", "stop")}
    return {"prompt": request.WhichOneof("input") or "input", **sampling}


def model_info_response(state: ServingState) -> pb.ModelInfoResponse:
    """Every fact of the served model's ModelInfo, and what only the server knows."""
    return pb.ModelInfoResponse(model_name=state.model_name, has_tokenizer=state.tokenizer is not None,
                                **state.info.to_dict())


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, state: ServingState):
        self.state = state

    def _checked(self, request) -> tuple[str, list[int] | str, SamplingParams, list[str]]:
        """(request id, prompt token ids or text, sampling params, stop strings) of a valid request;
        RequestError naming the message's field otherwise."""
        info, tokenizer = self.state.info, self.state.tokenizer
        kind = request.WhichOneof("input")
        try:
            rid = validation.request_id(request.request_id) if request.request_id else new_request_id()
            if kind is None:
                raise RequestError("input", "set token_ids or text")
            if kind == "text" and tokenizer is None:
                raise RequestError("text", "this model has no tokenizer; send token_ids")
            prompt = validation.text(request.text, info) if kind == "text" else \
                validation.token_ids(list(request.token_ids.ids), info)
            stop = validation.stop_strings(list(request.sampling.stop))
            if stop and tokenizer is None:
                raise RequestError("stop", "this model has no tokenizer, so no text to find stop strings in")
            return rid, prompt, validation.sampling(info, **sampling_fields(request.sampling)), stop
        except RequestError as e:
            raise validation.renamed(e, field_names(request)) from None

    async def _refuse(self, context, new_request: bool = True) -> None:
        refusal = self.state.refusal(new_request)
        if refusal is not None:
            await context.abort(refusal[0].grpc, refusal[1])

    async def _stream(self, request, context):
        await self._refuse(context)
        client = self.state.client
        try:
            rid, prompt, params, stop = self._checked(request)
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if isinstance(prompt, str):
            prompt = self.state.tokenizer.encode(prompt)
        text = TextStream(self.state.tokenizer, stop)
        t0 = time.monotonic()
        try:
            async with aclosing(client.stream(prompt, params, rid)) as outputs:
                async for out in outputs:
                    msg = pb.GenerateResponse(request_id=rid, token_ids=out.new_token_ids,
                                              logprobs=out.new_logprobs or [], text=text.add(out))
                    if text.done:
                        msg.finish_reason = FINISH.get(text.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
                        msg.usage.prompt_tokens = out.num_prompt_tokens
                        msg.usage.completion_tokens = len(text.token_ids)
                    yield msg
                    if text.done:  # at a stop string: leaving the stream aborts the request
                        break
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - refused by the engine, or the engine failed or restarts
            status = statuses.of(e)
            if status is None:  # the engine failed or restarts: retriable
                log.warning("request %s failed: %s", rid, e)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"the engine is unavailable: {_short(e)}")
            message = validation.renamed(e, field_names(request)) if isinstance(e, RequestError) else e
            await context.abort(status.grpc, str(message))
        finally:
            log.info("request %s prompt_tokens=%d output_tokens=%d finish=%s %.3fs", rid, len(prompt),
                     len(text.token_ids), text.finish_reason or "cancelled", time.monotonic() - t0)

    async def Generate(self, request, context):
        async for piece in self._stream(request, context):
            yield piece

    async def Complete(self, request, context):
        whole = pb.GenerateResponse()
        async for piece in self._stream(request, context):
            whole.request_id = piece.request_id
            whole.token_ids.extend(piece.token_ids)
            whole.logprobs.extend(piece.logprobs)
            whole.text += piece.text
            if piece.finish_reason:
                whole.finish_reason = piece.finish_reason
                whole.usage.CopyFrom(piece.usage)
        return whole

    async def ModelInfo(self, request, context):
        await self._refuse(context, new_request=False)
        return model_info_response(self.state)

    async def Experts(self, request, context):
        await self._refuse(context, new_request=False)
        try:
            e = await self.state.client.experts()
        except Exception as error:  # noqa: BLE001 - the front-end failed or restarts: retriable
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the engine is unavailable: {_short(error)}")
        return pb.ExpertsResponse(
            num_experts=e["num_experts"], num_shards=len(e["layers"][0]) if e["layers"] else 0,
            layers=[pb.LayerPlacement(shards=[pb.ShardSlots(experts=s) for s in layer]) for layer in e["layers"]],
            tokens_per_shard=e["tokens_per_shard"], tokens_per_expert=e["tokens_per_expert"],
            load=[pb.LayerLoad(tokens_per_shard=t) for t in e["tokens_per_layer_shard"]],
            placement_epoch=e["epoch"], shards_in_group=e["members"])


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:300] if text else type(e).__name__


class _Malformed:
    """What a request that does not parse as its message becomes, so that the call gets INVALID_ARGUMENT
    (grpc answers UNKNOWN for a deserializer's exception)."""

    def __init__(self, error: Exception):
        self.message = f"the request is not a valid message: {error}"


class Guard(grpc.aio.ServerInterceptor):
    """Every call but health checks needs the bearer token (when there is one): UNAUTHENTICATED otherwise.
    Requests to the Inference service that do not parse get INVALID_ARGUMENT."""

    OPEN = ("/grpc.health.v1.Health/",)

    def __init__(self, token: BearerToken | None):
        self.token = token

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        if self.token is not None and not details.method.startswith(self.OPEN):
            metadata = dict(details.invocation_metadata or ())
            if not self.token.accepts(metadata.get("authorization")):
                return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED,
                                 "missing or wrong bearer token (metadata authorization: Bearer <token>)")
        if details.method.startswith(f"/{SERVICE}/"):
            return _tolerant(handler)
        return handler


def _behaviour(handler) -> str:
    return ("stream" if handler.request_streaming else "unary") + "_" + \
        ("stream" if handler.response_streaming else "unary")


def _refusing(handler, code: grpc.StatusCode, details: str):
    async def refuse(request, context):
        await context.abort(code, details)

    return handler._replace(**{_behaviour(handler): refuse})


def _tolerant(handler):
    """The handler of a unary-request method, with a request that does not parse answered INVALID_ARGUMENT."""
    parse, kind = handler.request_deserializer, _behaviour(handler)
    behaviour = getattr(handler, kind)

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's
            return _Malformed(e)

    if handler.response_streaming:
        async def checked(request, context):
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for response in behaviour(request, context):
                yield response
    else:
        async def checked(request, context):
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behaviour(request, context)

    return handler._replace(request_deserializer=deserialize, **{kind: checked})


class GrpcEndpoint:
    """The grpc.aio server: the Inference service, health (NOT_SERVING until ``set_serving``, and again once
    draining), reflection; TLS when given, and the state's bearer token when it has one."""

    def __init__(self, state: ServingState, host: str, port: int, tls: TLSFiles | None = None):
        options = [("grpc.max_receive_message_length", validation.MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", validation.MAX_MESSAGE_BYTES)]
        self.server = grpc.aio.server(options=options, interceptors=[Guard(state.token)])
        self.state = state
        pb_grpc.add_InferenceServicer_to_server(InferenceService(state), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (pb.DESCRIPTOR.services_by_name["Inference"].full_name, health.SERVICE_NAME,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        address = f"{host}:{port}"
        self.port = self.server.add_secure_port(address, tls.server_credentials()) if tls else \
            self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self.host = host

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        serving = serving and not self.state.draining
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.server.stop(grace_s)
