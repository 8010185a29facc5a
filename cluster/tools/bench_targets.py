"""What ``epserve bench`` drives: one async streaming call per request, whatever serves it.

Each target turns (prompt token ids, output length) into an async iterator of *token counts*, one per piece
as it arrives, so the load loop measures TTFT and inter-token latency the same way for every server:

* ``GrpcTarget``: our ``epserve.v1.Inference/Generate`` (server streaming);
* ``OpenAITarget``: any OpenAI-compatible ``/v1/completions`` with ``stream: true`` (ours, vLLM, ...): the
  prompt as token ids, greedy, ``ignore_eos`` and ``min_tokens`` (vLLM's extensions) so that every request
  makes exactly its output length; counts come from ``usage`` (``stream_options.include_usage``) when the
  server sends it, else one token per text chunk;
* ``EngineTarget``: a Frontend in this process (``shards=0``) or a cluster started here (``shards=N``),
  through the same async API the servers use.

Once started, a target knows the served model's vocabulary (``vocab_size``: from gRPC's ModelInfo, the
``/v1/models`` card, or the engine; None from a server that does not say), so that prompts are made of ids
the model has. A request that fails raises ``RequestFailed`` with the server's one-line reason.

Network targets must be on the loopback interface: the benchmark never sends load to another machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from typing import AsyncIterator
from urllib.parse import urlparse

import aiohttp
import grpc

from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.frontend import Frontend

from ..api import inference_pb2 as pb
from ..api import inference_pb2_grpc as pb_grpc
from ..config import ClusterConfig
from ..fixtures.builtin import checkpoint_or_builtin
from ..launcher import Cluster
from ..serving.frontend_client import FrontendClient
from ..serving.state import new_request_id


class RequestFailed(RuntimeError):
    """The server refused or failed a request (the message is its reason)."""


def require_loopback(host: str) -> None:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve {host!r}: {e}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"{host!r} is not a loopback address: the benchmark only drives servers on 127.0.0.1")


def _rpc_failure(e: grpc.aio.AioRpcError) -> RequestFailed:
    return RequestFailed(f"{e.code().name}: {e.details()}")


class GrpcTarget:
    def __init__(self, address: str, timeout_s: float = 600.0):
        host = address.rsplit(":", 1)[0].strip("[]")
        require_loopback(host)
        self.address, self.timeout_s = address, timeout_s
        self.channel, self.vocab_size = None, None

    async def start(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = pb_grpc.InferenceStub(self.channel)
        try:
            info = await self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(f"grpc://{self.address}: {_rpc_failure(e)}") from None
        self.vocab_size = info.vocab_size

    async def stream(self, prompt_ids: list[int], output_len: int) -> AsyncIterator[int]:
        req = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=output_len, temperature=0.0,
                                                            ignore_eos=True))
        req.token_ids.ids.extend(prompt_ids)
        try:
            async for piece in self.stub.Generate(req, timeout=self.timeout_s):
                if piece.token_ids:
                    yield len(piece.token_ids)
        except grpc.aio.AioRpcError as e:
            raise _rpc_failure(e) from None

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


class OpenAITarget:
    def __init__(self, base_url: str, model: str | None = None, timeout_s: float = 600.0):
        url = urlparse(base_url if "://" in base_url else f"http://{base_url}")
        require_loopback(url.hostname or "")
        self.base = f"{url.scheme}://{url.netloc}{url.path.rstrip('/')}"
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.model, self.timeout_s = model, timeout_s
        self.session, self.vocab_size = None, None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                             connector=aiohttp.TCPConnector(limit=0))
        async with self.session.get(f"{self.base}/models") as r:
            if r.status != 200:
                raise RequestFailed(f"{self.base}/models: HTTP {r.status}: {(await r.text())[:300]}")
            cards = (await r.json())["data"]
        card = next((c for c in cards if c["id"] == self.model), cards[0]) if self.model else cards[0]
        self.model, self.vocab_size = card["id"], card.get("vocab_size")

    async def stream(self, prompt_ids: list[int], output_len: int) -> AsyncIterator[int]:
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": output_len, "min_tokens": output_len,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        seen = 0
        async with self.session.post(f"{self.base}/completions", json=body) as r:
            if r.status != 200:
                raise RequestFailed(f"HTTP {r.status}: {(await r.text())[:300]}")
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RequestFailed(chunk["error"].get("message", "the stream failed"))
                total = (chunk.get("usage") or {}).get("completion_tokens")
                has_text = any(c.get("text") or c.get("token_ids") for c in chunk.get("choices", []))
                new = (total - seen) if total is not None else int(has_text)
                if new > 0:
                    seen += new
                    yield new

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class EngineTarget:
    """A Frontend in this process (``shards=0``: every expert local) or a cluster of ``shards`` actors."""

    def __init__(self, checkpoint: str, shards: int = 0, engine: dict | None = None,
                 cluster: dict | None = None, dtype: str = ClusterConfig.dtype, affinity: bool = True):
        self.checkpoint, self.shards, self.engine, self.dtype = checkpoint, shards, engine or {}, dtype
        self.settings = cluster or {}  # more ClusterConfig fields for shards > 0
        self.affinity = affinity  # the router's prefix affinity (several front-ends)
        self.cluster, self.vocab_size = None, None

    async def start(self) -> None:
        if self.shards:
            cfg = ClusterConfig(checkpoint=self.checkpoint, shards=self.shards, engine=self.engine,
                                dtype=self.dtype, **self.settings)
            self.cluster = await asyncio.to_thread(Cluster(cfg).start)
            self.client = FrontendClient(self.cluster.frontends, block_size=cfg.engine.block_size,
                                         affinity=self.affinity)
        else:
            frontend = await asyncio.to_thread(Frontend, self.checkpoint, 0, self.engine, dtype=self.dtype)
            await frontend.start()
            self.client = FrontendClient(frontend)
        self.vocab_size = (await self.client.model_info()).vocab_size

    async def stream(self, prompt_ids: list[int], output_len: int) -> AsyncIterator[int]:
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
        async for out in self.client.stream(prompt_ids, params, new_request_id("bench")):
            if out.new_token_ids:
                yield len(out.new_token_ids)

    async def close(self) -> None:
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.shutdown)
        else:
            await self.client.frontend.stop()


def make_target(target: str | None, checkpoint: str | None, shards: int, model: str | None,
                engine: dict | None = None, dtype: str = ClusterConfig.dtype, cluster: dict | None = None):
    """``grpc://host:port``, ``http://host:port`` (OpenAI), or None for the in-process engine / cluster
    (``cluster``: more ClusterConfig fields)."""
    if target is None:
        return EngineTarget(checkpoint_or_builtin(checkpoint), shards, engine, cluster, dtype=dtype)
    if target.startswith("grpc://"):
        return GrpcTarget(target[len("grpc://"):])
    if target.startswith(("http://", "https://")):
        return OpenAITarget(target, model)
    raise ValueError(f"target must be grpc://HOST:PORT or http://HOST:PORT, got {target!r}")
