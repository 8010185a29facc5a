"""Parameters of the text decoder by role, counted from the config exactly as the checkpoint holds them
(every tensor of ``Gemma4Model.state_dict()``, the ``layer_scalar`` buffers included; tests compare with a
written checkpoint). A front-end holds every role but the routed experts; the shards hold those."""

from __future__ import annotations

from dataclasses import dataclass

from epserve.actors.model.config import ModelConfig

FRONTEND_ROLES = ("embedding", "attention", "dense_mlp", "router", "norms")


@dataclass(frozen=True)
class ParamCount:
    embedding: int  # the tied embedding, which is also the LM head
    attention: int  # q/k/v/o projections and the q/k norms, every layer
    dense_mlp: int  # the always-on GeGLU MLP (and a separate shared expert, where the model has one)
    router: int  # proj, scale, per_expert_scale
    norms: int  # the seven layer norms, layer_scalar, the final norm
    experts: int  # the routed experts, every layer
    per_expert: int  # one expert of one layer (gate_up + down)
    num_layers: int
    top_k: int

    @property
    def frontend(self) -> int:
        return self.embedding + self.attention + self.dense_mlp + self.router + self.norms

    @property
    def total(self) -> int:
        return self.frontend + self.experts

    @property
    def active(self) -> int:
        """What one token uses: everything but the routed experts, plus top_k experts per layer."""
        return self.frontend + self.num_layers * self.top_k * self.per_expert

    def by_role(self) -> dict[str, int]:
        return {role: getattr(self, role) for role in FRONTEND_ROLES} | {"experts": self.experts}


def attention_params(cfg: ModelConfig, layer: int) -> int:
    shape = cfg.attention(layer)
    q = cfg.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    projections = cfg.hidden_size * (q + kv * (1 if shape.k_eq_v else 2) + q)  # q, k, [v], o
    return projections + 2 * shape.head_dim  # q_norm, k_norm


def count_params(cfg: ModelConfig) -> ParamCount:
    H, L, E = cfg.hidden_size, cfg.num_layers, cfg.num_experts
    per_expert = 3 * H * cfg.moe_intermediate_size  # gate_up [2I, H] + down [H, I]
    return ParamCount(
        embedding=cfg.vocab_size * H,
        attention=sum(attention_params(cfg, i) for i in range(L)),
        dense_mlp=L * 3 * H * (cfg.intermediate_size + cfg.shared_expert_intermediate_size),
        router=L * (E * H + H + E),
        norms=L * (7 * H + 1) + H,
        experts=L * E * per_expert,
        per_expert=per_expert,
        num_layers=L,
        top_k=cfg.top_k,
    )
