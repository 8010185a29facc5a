"""What the servers say about the served model and its cluster, and what they check requests against.

``Frontend.model_info()`` answers with a ``ModelInfo``; the gRPC ``ModelInfo`` call and the OpenAI
``/v1/models`` card copy every field of it (cluster/serving/), so a new fact is one field here, with where its
value comes from in ``of`` below (and, for gRPC, its line in proto/'s ``ModelInfoResponse``: a test checks
that every field is there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .model import precision

ARCHITECTURE = "Gemma4ForConditionalGeneration (text decoder)"


@dataclass(frozen=True)
class ModelInfo:
    # what a request is checked against
    vocab_size: int
    max_model_len: int  # prompt + output tokens of one request, at most
    eos_token_ids: tuple[int, ...]
    # the model
    architecture: str
    hidden_size: int
    num_layers: int
    num_experts: int
    experts_per_token: int
    # where and how it runs
    num_shards: int
    device: str
    dtype: str  # the compute dtype
    cpu_isa: str  # the front-end's CPU's best matrix instruction set (model/precision.py)

    @classmethod
    def of(cls, frontend) -> ModelInfo:
        """The facts of a Frontend (its model's config, its engine, where it computes)."""
        cfg = frontend.model.cfg
        return cls(architecture=ARCHITECTURE, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                   num_layers=cfg.num_layers, num_experts=cfg.num_experts, experts_per_token=cfg.top_k,
                   num_shards=frontend.num_shards, max_model_len=frontend.engine.max_model_len,
                   eos_token_ids=tuple(cfg.eos_token_ids), device=str(frontend.device),
                   dtype=precision.dtype_name(frontend.dtype), cpu_isa=precision.cpu_isa())

    def to_dict(self) -> dict:
        return asdict(self)
