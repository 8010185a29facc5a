"""The gRPC endpoint: ``epserve.v1.Inference`` on a grpc.aio server, with the standard health service and
server reflection.

It runs inside the Serve ingress replica rather than behind Serve's gRPC proxy: measured on a 2-core machine
a grpc.aio server in a replica answers a unary call in 2.5-6 ms and supports health and reflection
natively, while Serve's proxy costs 13-15 ms per call and needs extra work for standard health checks
(docs/grpc.md has the numbers and the command).
"""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epserve.actors.engine.sampling import RequestError

from .api import inference_pb2 as pb
from .api import inference_pb2_grpc as pb_grpc
from .serving import ServingState, new_request_id

SERVICE = "epserve.v1.Inference"
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
log = logging.getLogger("epserve.grpc")


def sampling_dict(s: pb.SamplingParams) -> dict:
    """The engine's SamplingParams fields from the message (unset fields keep the engine's defaults)."""
    out = {name: getattr(s, name) for name in ("max_tokens", "temperature", "top_k", "top_p", "seed",
                                               "min_tokens") if s.HasField(name)}
    out.update(stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos, logprobs=s.logprobs)
    return out


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, state: ServingState):
        self.state = state

    async def _prompt(self, request, context) -> list[int]:
        kind = request.WhichOneof("input")
        if kind is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input: set token_ids or text")
        if kind == "text":
            if self.state.tokenizer is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "input.text: this model has no tokenizer; send token_ids")
            return self.state.tokenizer.encode(request.text)
        return list(request.token_ids.ids)

    async def _stream(self, request, context):
        if not self.state.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the cluster is starting or recovering; retry")
        rid = request.request_id or new_request_id()
        prompt = await self._prompt(request, context)
        detok = self.state.tokenizer.detokenizer() if self.state.tokenizer is not None else None
        t0, n_out, reason = time.monotonic(), 0, None
        try:
            async for item in self.state.client.stream(prompt, sampling_dict(request.sampling), rid):
                n_out = item["num_output_tokens"]
                reason = item["finish_reason"]
                text = detok.step(item["new_token_ids"]) if detok else ""
                if detok and item["finished"]:
                    text += detok.flush()
                msg = pb.GenerateResponse(request_id=rid, token_ids=item["new_token_ids"],
                                          logprobs=item["new_logprobs"] or [], text=text)
                if item["finished"]:
                    msg.finish_reason = FINISH.get(reason, pb.FINISH_REASON_UNSPECIFIED)
                    msg.usage.prompt_tokens = item["num_prompt_tokens"]
                    msg.usage.completion_tokens = n_out
                yield msg
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # noqa: BLE001 - the engine failed or restarts: retriable
            if isinstance(e, (grpc.aio.AbortError,)):
                raise
            log.warning("request %s failed: %s", rid, e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the engine is unavailable: {_short(e)}")
        finally:
            log.info("request %s prompt_tokens=%d output_tokens=%d finish=%s %.3fs", rid, len(prompt), n_out,
                     reason or "cancelled", time.monotonic() - t0)

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
        if not self.state.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the cluster is starting; retry")
        i = self.state.info
        return pb.ModelInfoResponse(
            model_name=self.state.model_name, architecture="Gemma4ForConditionalGeneration (text decoder)",
            vocab_size=i["vocab_size"], hidden_size=i["hidden_size"], num_layers=i["num_layers"],
            num_experts=i["num_experts"], experts_per_token=i["top_k"], num_shards=i["num_shards"],
            max_model_len=i["max_model_len"], eos_token_ids=i["eos_token_ids"],
            has_tokenizer=self.state.tokenizer is not None, device=i["device"], dtype=i["dtype"])


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:300] if text else type(e).__name__


class GrpcEndpoint:
    """The grpc.aio server: the Inference service, health (NOT_SERVING until ``set_serving``), reflection."""

    def __init__(self, state: ServingState, host: str = "127.0.0.1", port: int = 50051,
                 max_message_bytes: int = 4 << 20):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self.server = grpc.aio.server(options=options)
        pb_grpc.add_InferenceServicer_to_server(InferenceService(state), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (pb.DESCRIPTOR.services_by_name["Inference"].full_name, health.SERVICE_NAME,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self.host = host

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.server.stop(grace_s)
