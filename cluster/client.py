"""``epserve client``: send one prompt over gRPC and print the answer as it streams."""

from __future__ import annotations

import sys

import grpc

from .api import inference_pb2 as pb
from .api import inference_pb2_grpc as pb_grpc


def request(prompt: str | None = None, prompt_ids: list[int] | None = None, max_tokens: int = 32,
            temperature: float = 0.0, seed: int | None = None, ignore_eos: bool = False,
            request_id: str = "") -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos)
    if seed is not None:
        sampling.seed = seed
    req = pb.GenerateRequest(request_id=request_id, sampling=sampling)
    if prompt_ids is not None:
        req.token_ids.ids.extend(prompt_ids)
    else:
        req.text = prompt or ""
    return req


def stream(target: str, req: pb.GenerateRequest, timeout_s: float = 120.0, out=sys.stdout):
    """Print text pieces (or token ids when the model has no tokenizer) as they come; return the pieces."""
    pieces = []
    with grpc.insecure_channel(target) as channel:
        for piece in pb_grpc.InferenceStub(channel).Generate(req, timeout=timeout_s):
            pieces.append(piece)
            out.write(piece.text if piece.text else "".join(f" {t}" for t in piece.token_ids))
            out.flush()
    out.write("\n")
    return pieces
