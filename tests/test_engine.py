"""The engine: continuous batching over the paged KV cache, chunked prefill, prefix caching, preemption,
sampling and streaming, checked against transformers and against itself run one request at a time."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from epserve.actors.engine.block_manager import DROPPED
from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.kv_cache import table_arrays
from epserve.actors.engine.sampler import filtered_probs, sample
from epserve.actors.engine.sampling import RequestError, SamplingParams
from epserve.actors.engine.sequence import Sequence, Status
from epserve.actors.model.config import FULL, SLIDING
from epserve.actors.model.loader import load_model

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def mixed_workload(vocab: int, n: int = 32, seed: int = 0):
    """n prompts of 1..600 tokens with 1..24 new tokens each."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 600, 2, 33, 31, 32, 64, 65, 100, 250] + torch.randint(1, 601, (n - 10,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lengths]
    new = torch.randint(1, 25, (n,), generator=g).tolist()
    return prompts, [SamplingParams(max_tokens=m, ignore_eos=True, logprobs=True) for m in new]


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def batch_run(tiny_model):
    prompts, params = mixed_workload(tiny_model.cfg.vocab_size)
    engine = LLMEngine(tiny_model, EngineConfig(max_num_batched_tokens=256, max_num_seqs=32))
    return prompts, params, engine.generate(prompts, params), engine


def test_batch_equals_alone_and_transformers(tiny_model, hf_model, batch_run, tools):
    prompts, params, together, _ = batch_run
    assert tiny_model.cfg.sliding.window < 600  # windows are exercised
    for prompt, p, out in zip(prompts, params, together):
        alone = LLMEngine(tiny_model).generate([prompt], p)[0]
        assert alone.token_ids == out.token_ids
        assert len(out.token_ids) == p.max_tokens and out.finish_reason == "length"
        assert tools.hf_greedy(hf_model, prompt, p.max_tokens) == out.token_ids


def test_chunked_prefill_equals_one_shot(tiny_model):
    prompts, params = mixed_workload(tiny_model.cfg.vocab_size, n=12, seed=1)
    one_shot = LLMEngine(tiny_model, EngineConfig(max_num_batched_tokens=4096)).generate(prompts, params)
    chunked_engine = LLMEngine(tiny_model, EngineConfig(max_num_batched_tokens=48))
    chunked = chunked_engine.generate(prompts, params)
    for a, b in zip(one_shot, chunked):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_preemption_resumes_identically(tiny_model, batch_run):
    prompts, params, together, _ = batch_run
    # few blocks: at most a couple of long requests fit at once, so the scheduler must preempt
    cfg = EngineConfig(max_num_batched_tokens=128, max_num_seqs=32, num_blocks={"full_attention": 90,
                       "sliding_attention": 30}, enable_prefix_caching=False)
    engine = LLMEngine(tiny_model, cfg)
    outs = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in together]
    assert engine.blocks.num_used() == 0


def test_prefix_caching_reuses_blocks_with_identical_output(tiny_model):
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 1024, (100,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 1024, (n,), generator=g).tolist() for n in (1, 7, 40)] + [shared]
    cached_engine = LLMEngine(tiny_model, EngineConfig(max_num_seqs=1))  # one at a time: later ones hit
    cached = cached_engine.generate(prompts, GREEDY)
    plain = LLMEngine(tiny_model, EngineConfig(enable_prefix_caching=False)).generate(prompts, GREEDY)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    bs = cached_engine.config.block_size
    # 3 later requests share 6 full blocks (96 tokens); the bare prefix reuses all but its last block
    assert cached_engine.blocks.stats.hit_tokens >= 3 * (100 // bs - 1) * bs
    assert cached_engine.blocks.num_used() == 0


def test_blocks_all_free_after_finish_and_abort(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(max_num_batched_tokens=64))
    ids = [engine.add_request(list(range(3, 3 + n)), SamplingParams(max_tokens=50, ignore_eos=True))
           for n in (10, 70, 200)]
    for _ in range(5):
        engine.step()
    seq, pools = engine.requests[ids[1]], engine.blocks.pools
    # the blocks only this request holds (the others share its prompt's prefix through the prefix cache)
    own = sum(pools[kind].refs[b] == 1 for kind, table in seq.block_tables.items() for b in table if b >= 0)
    used = engine.blocks.num_used()
    assert own > 0
    assert engine.abort(ids[1]) and not engine.abort(ids[1])
    assert engine.blocks.num_used() == used - own  # at once, not at the next step
    engine.abort("no-such-request")
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_used() == 0


@pytest.mark.parametrize("config", [EngineConfig(max_num_batched_tokens=256),
                                    EngineConfig(num_blocks={FULL: 64, SLIDING: 2}, max_num_batched_tokens=128)])
def test_warm_up_runs_a_full_chunk_and_leaves_no_trace(tiny_model, config):
    """A throw-away prefill of a whole chunk (a shorter one where the cache would never take it: 2 sliding
    blocks) of tokens spread over the vocabulary, then nothing held, nothing cached, no prefix counter moved,
    and the same tokens after it."""
    engine = LLMEngine(tiny_model, config)
    before = engine.generate([[5, 6, 7]], GREEDY)[0].token_ids
    stats, chunks = dataclasses.replace(engine.blocks.stats), []
    step = engine.runner.run
    engine.runner.run = lambda batch: chunks.append(sum(batch.num_new)) or step(batch)
    prompts, add = [], engine.add_request
    engine.add_request = lambda prompt, *a: prompts.append(prompt) or add(prompt, *a)
    engine.warm_up()
    # its tokens spread over the vocabulary (routed to nearly every expert, as real prompts are), not one repeated
    assert len(set(prompts[-1])) == min(len(prompts[-1]), tiny_model.cfg.vocab_size)
    assert chunks == [256] if config.num_blocks is None else len(chunks) == 1 and 1 <= chunks[0] < 128
    assert not engine.requests and engine.blocks.num_used() == 0 and engine.blocks.stats == stats
    assert all(not pool.by_hash for pool in engine.blocks.pools.values())
    assert engine.blocks.prefix_caching == config.enable_prefix_caching
    assert engine.generate([[5, 6, 7]], GREEDY)[0].token_ids == before


def test_a_failed_warm_up_leaves_nothing_to_recompute(tiny_model):
    """A warm-up whose step fails (on a cluster: a shard lost meanwhile) raises, and the throw-away request is
    gone, blocks and all: nothing of it is computed again once the group is back."""
    engine = LLMEngine(tiny_model, EngineConfig(max_num_batched_tokens=256))
    step, calls = engine.runner.run, []

    def failing(batch):
        calls.append(batch)
        raise RuntimeError("collective failed")

    engine.runner.run = failing
    with pytest.raises(RuntimeError, match="collective failed"):
        engine.warm_up()
    assert len(calls) == 1 and not engine.requests and not engine.has_unfinished()
    assert engine.blocks.num_used() == 0
    engine.runner.run = step
    assert engine.generate([[5, 6, 7]], GREEDY)[0].finish_reason == "length"


def test_request_that_can_never_fit_the_sliding_cache_is_refused(tiny_model):
    """Plenty of full-layer blocks (1024 tokens) but 2 sliding blocks: a 100-token prompt prefilled in one
    chunk needs 7 at once on the sliding layers, so it could never run, however long it waited."""
    engine = LLMEngine(tiny_model, EngineConfig(num_blocks={FULL: 64, SLIDING: 2}, max_num_batched_tokens=128))
    with pytest.raises(RequestError, match="can never fit the KV cache: it needs 7 KV blocks of 16 tokens on "
                                           "sliding_attention layers, the cache has 2"):
        engine.add_request(list(range(3, 103)), SamplingParams(max_tokens=10))
    assert engine.generate([[5, 6, 7]], GREEDY)[0].finish_reason == "length"  # 15 tokens: one block


def test_preemption_picks_the_most_recently_admitted(tiny_model):
    """Six full blocks for three requests admitted one step apart, two blocks each. The OLDEST one (29-token
    prompt) is the first to need a third block: the newest is preempted for it, not the one asking."""
    engine = LLMEngine(tiny_model, EngineConfig(num_blocks={FULL: 6, SLIDING: 30}, enable_prefix_caching=False))
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    seqs = []
    for prompt in (list(range(3, 32)), list(range(100, 120)), list(range(200, 220))):
        seqs.append(engine.requests[engine.add_request(prompt, params)])
        engine.step()
        assert seqs[-1].status is Status.RUNNING  # admitted in this step: the admission order is seqs
    oldest, middle, newest = seqs
    while engine.scheduler.num_preemptions == 0:
        engine.step()
    assert newest.status is Status.WAITING and newest.num_computed == 0 and newest.block_tables == {}
    assert oldest.status is middle.status is Status.RUNNING
    assert len(oldest.block_tables[FULL]) == 3 and oldest.num_computed > 2 * engine.config.block_size
    while engine.has_unfinished():
        engine.step()
    assert all(len(s.output_ids) == 20 for s in seqs) and engine.blocks.num_used() == 0


def test_failed_admission_counts_nothing_and_keeps_the_lru_order(tiny_model):
    """The head of the waiting queue is tried every step while memory is short: until it is admitted, the
    prefix-cache counters must not grow and the free blocks' LRU order must not change."""
    engine = LLMEngine(tiny_model, EngineConfig(num_blocks={FULL: 14, SLIDING: 40}))
    stats, full = engine.blocks.stats, engine.blocks.pools[FULL]
    cached = list(range(3, 67))  # 4 full blocks, left in the prefix cache
    engine.generate([cached, list(range(200, 232))], SamplingParams(max_tokens=1))
    assert (stats.queried_tokens, stats.hit_tokens) == (64 + 32, 0)
    lru = list(full.free)
    # a 120-token prompt takes 8 of the 14 blocks for its whole run; the second request would reuse the 4
    # cached blocks but needs 4 new ones too, and only 6 - 4 are left: it waits until the first finishes
    big = engine.add_request(list(range(300, 420)), SamplingParams(max_tokens=8, ignore_eos=True))
    waiting = engine.requests[engine.add_request(cached + list(range(500, 550)), SamplingParams(max_tokens=1))]
    for _ in range(7):
        engine.step()
        assert waiting.status is Status.WAITING and big in engine.requests
        assert (stats.queried_tokens, stats.hit_tokens) == (64 + 32 + 120, 0)
        assert list(full.free) == lru[8:]  # the 8 oldest were handed out, nothing else moved
    while engine.has_unfinished():
        engine.step()
    assert waiting.num_cached_prefix == 64 and engine.scheduler.num_preemptions == 0
    assert (stats.queried_tokens, stats.hit_tokens) == (64 + 32 + 120 + 114, 64)


def test_long_request_holds_bounded_sliding_blocks(tiny_model):
    cfg = EngineConfig(max_num_batched_tokens=64)
    engine = LLMEngine(tiny_model, cfg)
    rid = engine.add_request(list(range(3, 703)), SamplingParams(max_tokens=100, ignore_eos=True))
    seq, peak, pool = engine.requests[rid], 0, engine.blocks.pools[SLIDING]
    while engine.has_unfinished():
        engine.step()
        table = seq.block_tables.get(SLIDING, [])
        held = [b for b in table if b >= 0]
        if table:  # the dropped blocks are a prefix of the table, and every one of them is back in the pool
            assert table == [DROPPED] * (len(table) - len(held)) + held
            assert pool.num_free == pool.num_blocks - len(held)
        peak = max(peak, len(held))
    window, bs = tiny_model.cfg.sliding.window, cfg.block_size
    assert 0 < peak <= -(-(window - 1 + cfg.max_num_batched_tokens) // bs) + 1
    assert seq.num_tokens // bs > 5 * peak  # far fewer than the full layers hold


def test_block_table_arrays_follow_the_lists_across_steps():
    """The model runner's int64 copies of a request's block tables (kv_cache.table_arrays): blocks appended
    since the last step are copied, past the first capacity too; a new list (an admission) is copied whole."""
    seq = Sequence("r", [1], SamplingParams(), frozenset())
    seq.block_tables = {FULL: [3, 4], SLIDING: [5]}
    assert [table_arrays(seq)[k].array[:2].tolist() for k in (FULL, SLIDING)] == [[3, 4], [5, 0]]
    seq.block_tables[FULL].extend(range(10, 60))  # beyond the array's first capacity
    assert table_arrays(seq)[FULL].array[:52].tolist() == [3, 4, *range(10, 60)]
    seq.block_tables[SLIDING] += [6]  # the same list, grown
    assert table_arrays(seq)[SLIDING].array[:2].tolist() == [5, 6]
    seq.block_tables = {FULL: [7], SLIDING: [DROPPED, 8]}  # preempted and admitted again
    assert [table_arrays(seq)[k].array[:2].tolist() for k in (FULL, SLIDING)] == [[7, 0], [DROPPED, 8]]


def test_streaming_yields_tokens_every_step(tiny_model):
    engine = LLMEngine(tiny_model)
    a = engine.add_request([5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True))
    b = engine.add_request([8, 9], SamplingParams(max_tokens=3, ignore_eos=True))
    streamed = {a: [], b: []}
    finished = {}
    while engine.has_unfinished():
        outs = engine.step()
        assert {o.request_id for o in outs} <= {a, b} and outs
        for o in outs:
            assert len(o.new_token_ids) == 1
            streamed[o.request_id] += o.new_token_ids
            if o.finished:
                finished[o.request_id] = o.finish_reason
    assert len(streamed[a]) == 5 and len(streamed[b]) == 3 and finished == {a: "length", b: "length"}


def test_stop_tokens_and_eos(tiny_model):
    engine = LLMEngine(tiny_model)
    free = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    stop_at = free[3]
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=10, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[: free.index(stop_at) + 1]
    later = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=10, stop_token_ids=[stop_at],
                                                        min_tokens=free.index(stop_at) + 2))[0]
    assert stop_at not in later.token_ids[: free.index(stop_at) + 1]


def test_the_checkpoints_eos_ids_stop_by_default_and_ignore_eos_runs_on(tiny_model, monkeypatch):
    """No stop ids given: the checkpoint's eos ids stop a request (its last token), ignore_eos runs past them."""
    free = LLMEngine(tiny_model).generate([[5, 6, 7]], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    eos = free[4]  # treat a token the model makes as the checkpoint's eos
    monkeypatch.setattr(tiny_model, "cfg", dataclasses.replace(tiny_model.cfg, eos_token_ids=(eos,)))
    engine = LLMEngine(tiny_model)
    stopped = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=12))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free[: free.index(eos) + 1]
    on = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert on.finish_reason == "length" and on.token_ids == free


def test_logprobs_of_sampled_tokens_are_the_models(tiny_model, tools):
    """With temperature, top-k and top-p, each reported logprob is log_softmax of the model's own logits at
    that position (scored independently, the whole sequence at once) for the token drawn."""
    prompt = [5, 6, 7, 8]
    out = LLMEngine(tiny_model).generate([prompt], SamplingParams(
        max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True, logprobs=True))[0]
    ids = torch.tensor(prompt + out.token_ids)
    logp = torch.log_softmax(tools.our_logits(tiny_model, ids)[len(prompt) - 1 : -1], dim=-1)
    want = logp[torch.arange(len(out.token_ids)), torch.tensor(out.token_ids)]
    assert out.logprobs == pytest.approx(want.tolist(), abs=1e-4)


def test_bad_requests_are_refused_clearly(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_blocks={"full_attention": 8, "sliding_attention": 8},
                                                max_num_batched_tokens=32))
    cases = [
        ([], SamplingParams(), "prompt: is empty"),
        ([5, 99999], SamplingParams(), "outside the vocabulary"),
        ([5], SamplingParams(max_tokens=0), "max_tokens"),
        ([5], SamplingParams(temperature=-1.0), "temperature"),
        ([5], SamplingParams(top_p=0.0), "top_p"),
        ([5], SamplingParams(top_p=1.5), "top_p"),
        ([5], SamplingParams(top_k=-2), "top_k"),
        (list(range(3, 200)), SamplingParams(max_tokens=10), "exceeds the context length 128"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(RequestError, match=message):
            engine.add_request(prompt, params)
    assert engine.generate([[5, 6]], GREEDY)[0].finish_reason == "length"  # still serving


# ---- sampling -------------------------------------------------------------------------------------------

def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Written independently of the sampler: sort once, keep the top-k prefix, then the top-p prefix."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    order = torch.argsort(logits, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    mass = 0.0
    for rank, tok in enumerate(order.tolist()):
        if top_k and rank >= top_k:
            break
        kept_mass = p[order[:top_k]].sum() if top_k else 1.0
        if mass >= top_p * kept_mass:
            break
        keep[tok] = True
        mass += float(p[tok])
    out = torch.where(keep, p, torch.zeros_like(p))
    return (out / out.sum()).float()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6),
                                                     (0.9, 8, 0.8), (2.0, 1, 1.0)])
def test_sampling_distribution_matches_reference(temperature, top_k, top_p):
    logits = torch.randn(40, generator=torch.Generator().manual_seed(7)) * 2
    want = reference_probs(logits, temperature, top_k, top_p)
    got = filtered_probs(logits, temperature, top_k, top_p)
    assert torch.allclose(got, want, atol=1e-6)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=11, logprobs=True)
    seq = Sequence("s", [1], params, frozenset())
    n = 4000
    draws = [sample(logits[None], [seq])[0][0] for _ in range(n)]
    freq = torch.bincount(torch.tensor(draws), minlength=40).float() / n
    assert (freq[want == 0] == 0).all()  # never outside top-k / top-p
    assert (freq - want).abs().max() < 4 * (want * (1 - want) / n).sqrt().max() + 1e-3


def test_seed_reproduces_and_logprobs_match(tiny_model):
    engine = LLMEngine(tiny_model)
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True, logprobs=True)
    a = engine.generate([[5, 6, 7]], p)[0]
    b = engine.generate([[5, 6, 7], [9, 9, 9, 9]], p)[0]  # other requests in the batch do not matter
    assert a.token_ids == b.token_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    c = engine.generate([[5, 6, 7]], SamplingParams(**{**p.__dict__, "seed": 99}))[0]
    assert c.token_ids != a.token_ids
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seqs = [Sequence(str(i), [1], SamplingParams(logprobs=True), frozenset()) for i in range(3)]
    tokens, logprobs = sample(logits, seqs)
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs == pytest.approx(torch.log_softmax(logits, -1)[range(3), tokens].tolist(), abs=1e-6)


def test_the_context_is_what_the_model_was_trained_for(short_context_dir):
    """max_model_len: at most the model's max_position_embeddings, even when the KV cache could hold more; a
    setting may lower it, never raise it; a longer request is refused naming the limit."""
    model = load_model(short_context_dir)
    assert model.cfg.max_position_embeddings == 2048
    budget = EngineConfig(kv_cache_bytes=64 << 20)
    engine = LLMEngine(model, budget)
    assert engine.runner.full_capacity > 2048 and engine.max_model_len == 2048
    with pytest.raises(RequestError, match="exceeds the context length 2048") as refused:
        engine.add_request([5] * 5000, SamplingParams(max_tokens=16))
    assert refused.value.field == "prompt"
    assert LLMEngine(model, dataclasses.replace(budget, max_model_len=1000)).max_model_len == 1000
    assert LLMEngine(model, dataclasses.replace(budget, max_model_len=4096)).max_model_len == 2048
