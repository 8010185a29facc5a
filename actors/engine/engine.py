"""The in-process engine: add requests, step, stream outputs, abort. The cluster's front-end and the servers
drive this API; ``generate`` runs a list of prompts to completion as one continuous batch."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, replace

from ..model import cpu_threads
from ..model.gemma4 import ExpertExecutor, Gemma4Model
from .block_manager import BlockManager
from .config import EngineConfig
from .model_runner import ModelRunner
from .sampler import sample
from .sampling import Overloaded, RequestError, SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, Status


def spread_tokens(n: int, vocab_size: int) -> list[int]:
    """n token ids spread over the vocabulary (a prime stride), the same every time."""
    return [i * 7919 % vocab_size for i in range(n)]


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None


class LLMEngine:
    def __init__(self, model: Gemma4Model, config: EngineConfig | None = None,
                 experts: ExpertExecutor | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self.runner = ModelRunner(model, self.config, experts)
        self.blocks = BlockManager(self.config.block_size, self.runner.num_blocks, self.runner.windows,
                                   self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.blocks)
        # the context: what the model was trained for and the full layers' KV cache can hold (a setting may lower it)
        limit = min(model.cfg.max_position_embeddings, self.runner.full_capacity)
        self.max_model_len = min(self.config.max_model_len or limit, limit)
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.last_step_tokens = 0  # tokens computed by the last step (metrics)
        cpu_threads.release_team()  # this thread's OpenMP team: the engine may step on another thread

    # ---- requests ---------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        vocab = self.model.cfg.vocab_size
        if not prompt_ids:
            raise RequestError("prompt", "is empty")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise RequestError("prompt", f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        params.validate(vocab)
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError("max_tokens" if len(prompt_ids) < self.max_model_len else "prompt",
                               f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                               f"the context length {self.max_model_len}")
        why = self.blocks.fits_ever(total, self.config.max_num_batched_tokens)
        if why:
            raise RequestError("prompt", f"request can never fit the KV cache: it {why}")
        self._check_queue()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError("request_id", f"{request_id!r} is already running")
        eos = () if params.ignore_eos else self.model.cfg.eos_token_ids
        seq = Sequence(request_id, list(prompt_ids), params, frozenset(eos) | frozenset(params.stop_token_ids))
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def _check_queue(self) -> None:
        """Refuse a request that would wait beyond ``max_waiting`` (counted past the free running slots, so
        that a burst which fits the batch is never refused for arriving before the next step)."""
        limit = self.config.max_waiting
        if limit is not None and len(self.requests) >= self.config.max_num_seqs + limit:
            raise Overloaded(f"the server is at capacity ({self.config.max_num_seqs} requests running and "
                             f"{limit} waiting): retry later")

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it is not (or no longer) known."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def warm_up(self) -> None:
        """Run one throw-away request of a full prefill chunk (or the longest the cache takes), leaving no
        trace in the prefix cache or its counters: the first requests then do not pay what a first full-size
        step costs once (on a CPU the memory of its activations faulted in, oneDNN's first calls at its
        shapes: 2.5x a warm chunk on the `bench` preset). Its tokens are spread over the vocabulary
        (``spread_tokens``), so that the routers send them to every shard and nearly every expert, as real
        prompts do: one token repeated reached 8 experts, and the first real prefill then paid the rest (the
        `bench` preset's 64 x 128 tokens in the engine on 2 cores: 0.25-0.3 s over the next ones, 0.1 s when
        spread). Every front-end of a cluster does it at start, and the shards with it: the exchange marks its
        steps (OP_WARM_UP), so that no served rows, steps or expert load count it."""
        caching, stats = self.blocks.prefix_caching, replace(self.blocks.stats)
        self.blocks.prefix_caching, rid = False, None
        try:
            n = min(self.config.max_num_batched_tokens, self.max_model_len - 1)
            while n >= 1:
                try:
                    rid = self.add_request(spread_tokens(n, self.model.cfg.vocab_size),
                                           SamplingParams(max_tokens=1, ignore_eos=True), "warm-up")
                    break
                except RequestError:  # a small cache: a shorter one
                    n //= 2
            experts = self.runner.experts  # None: the model's own (nothing counts there)
            with experts.uncounted() if experts is not None else contextlib.nullcontext():
                while rid in self.requests:
                    self.step()
        finally:
            if rid is not None:
                self.abort(rid)  # a failed step (a lost shard) leaves nothing to recompute after a recovery
            self.blocks.prefix_caching, self.blocks.stats = caching, stats

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping ---------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self.last_step_tokens = sum(batch.num_new)
        if not batch:
            return []
        logits, sampling, argmax = self.runner.run(batch)
        self.num_steps += 1
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
            self.blocks.commit(seq)
        outputs = []
        if sampling:
            seqs = [batch.seqs[i] for i in sampling]
            tokens, logprobs = sample(logits, seqs, argmax)
            for seq, token, lp in zip(seqs, tokens, logprobs):
                outputs.append(self._append(seq, token, lp))
        return outputs

    def _append(self, seq: Sequence, token: int, logprob: float | None) -> RequestOutput:
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        reason = None
        if token in seq.stop_ids and seq.num_output >= seq.params.min_tokens:
            reason = "stop"
        elif seq.num_output >= seq.params.max_tokens:
            reason = "length"
        if reason:
            self.scheduler.finish(seq, reason)
            self.requests.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, [token], [logprob] if logprob is not None else None,
                             reason is not None, reason, seq.num_prompt, seq.num_output)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        seqs = [self.requests[i] for i in ids]
        while any(s.status is not Status.FINISHED for s in seqs):
            self.step()
        return [Completion(s.request_id, s.output_ids, s.finish_reason,
                           s.logprobs if s.params.logprobs else None) for s in seqs]

    # ---- stats ------------------------------------------------------------------------------------------
    @property
    def kv_usage(self) -> float:
        return self.blocks.usage()
