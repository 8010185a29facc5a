"""``epserve client``: send one prompt over gRPC and print the answer as it streams."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

from ..api import inference_pb2 as pb
from ..api import inference_pb2_grpc as pb_grpc


def request(prompt: str | None = None, prompt_ids: list[int] | None = None, max_tokens: int = 32,
            temperature: float = 0.0, seed: int | None = None, ignore_eos: bool = False,
            request_id: str = "", stop: list[str] = ()) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos, stop=stop)
    if seed is not None:
        sampling.seed = seed
    req = pb.GenerateRequest(request_id=request_id, sampling=sampling)
    if prompt_ids is not None:
        req.token_ids.ids.extend(prompt_ids)
    else:
        req.text = prompt or ""
    return req


def channel(target: str, ca_file: str | None = None) -> grpc.Channel:
    """Plaintext, or TLS verifying the server against the PEM certificate(s) in ``ca_file``."""
    if ca_file is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(ca_file).read_bytes()))


def auth_metadata(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


def stream(target: str, req: pb.GenerateRequest, timeout_s: float = 120.0, out=sys.stdout,
           ca_file: str | None = None, token: str | None = None):
    """Print text pieces (or token ids when the model has no tokenizer) as they come; return the pieces."""
    pieces = []
    with channel(target, ca_file) as ch:
        stub, metadata = pb_grpc.InferenceStub(ch), auth_metadata(token)
        # asked, not guessed from a piece: with a tokenizer a piece's text is empty while it holds back the
        # bytes of a character that the next token completes
        as_text = req.WhichOneof("input") == "text" or stub.ModelInfo(
            pb.ModelInfoRequest(), timeout=timeout_s, metadata=metadata).has_tokenizer
        for piece in stub.Generate(req, timeout=timeout_s, metadata=metadata):
            pieces.append(piece)
            out.write(piece.text if as_text else "".join(f" {t}" for t in piece.token_ids))
            out.flush()
    out.write("\n")
    return pieces
