"""Turns the logits of one step into tokens, per request: greedy, or temperature then top-k then top-p.

Log-probabilities are those of the model's own distribution (``log_softmax`` of the raw logits), as vLLM
reports by default. A request with a seed draws from its own generator, so its output does not depend on
what else is in the batch.
"""

from __future__ import annotations

import torch

from .sequence import Sequence


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a sampled request draws from: softmax(logits / T), restricted to the top-k tokens
    and then to the smallest set whose probability reaches top_p (renormalised). logits [V] fp32."""
    scaled = logits / temperature
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of the tokens ranked above each token
        drop = order[before >= top_p]
        probs[drop] = 0.0
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, seqs: list[Sequence],
           argmax: torch.Tensor | None = None) -> tuple[list[int], list[float | None]]:
    """logits [B, V] for the requests ``seqs`` -> (token ids, chosen-token logprobs or None). ``argmax``: each
    row's argmax where the caller has it already (the model's head finds it in its last pass)."""
    logits = logits.float()
    tokens = (logits.argmax(dim=-1) if argmax is None else argmax).tolist()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.min_tokens and seq.num_output < p.min_tokens:
            blocked = logits[row].clone()
            blocked[list(seq.stop_ids)] = float("-inf")
            if p.greedy:
                tokens[row] = int(blocked.argmax())
            logits_row = blocked
        else:
            logits_row = logits[row]
        if not p.greedy:
            probs = filtered_probs(logits_row, p.temperature, p.top_k, p.top_p)
            tokens[row] = int(torch.multinomial(probs, 1, generator=seq.generator))
    logprobs: list[float | None] = [None] * len(seqs)
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs]
    if wanted:
        lp = torch.log_softmax(logits[wanted], dim=-1)
        for j, i in enumerate(wanted):
            logprobs[i] = float(lp[j, tokens[i]])
    return tokens, logprobs
