"""Engine settings: batch limits and the KV-cache budget."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # running requests at most
    max_num_batched_tokens: int = 1024  # tokens per step (decode tokens + prefill chunks)
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int = 1 << 30  # memory for the KV cache, split between sliding and full layers
    num_blocks: dict[str, int] | None = None  # explicit blocks per attention kind (overrides the budget)
    # prompt + output tokens of one request; at most (and by default) the model's max_position_embeddings and
    # what the full-layer cache can hold
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    # Requests that may wait for a running slot (beyond the max_num_seqs running ones); more are refused at
    # once (Overloaded), so that a burst costs the servers a bounded amount of memory. None: no limit
    max_waiting: int | None = 256
    # one throw-away request of a full prefill chunk before serving (LLMEngine.warm_up)
    warm_up: bool = True

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"EngineConfig.max_waiting must be >= 0 or None, got {self.max_waiting}")
