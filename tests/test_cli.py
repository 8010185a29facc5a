"""The ``epserve`` command line: make-checkpoint and generate, run as a user runs them."""

from __future__ import annotations

import json
import time

import torch
from transformers import AutoModelForCausalLM

from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.model.loader import load_model
from epserve.cluster.fixtures.builtin import builtin_checkpoint
from epserve.cluster.fixtures.checkpoint import preset

from helpers import free_port, run


def test_generate_matches_transformers_greedy(tiny_dir, tools):
    prompts = [[2, 17, 300, 42], [5, 6, 7, 8, 9, 10, 11] * 7, [100]]
    args = [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]
    out = run("generate", "--checkpoint", tiny_dir, *args, "--max-tokens", 32, "--ignore-eos", "--json",
              "--dtype", "float32")
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == len(prompts)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    for prompt, line in zip(prompts, lines):
        assert line == {"token_ids": tools.hf_greedy(ref, prompt, 32), "finish_reason": "length"}


def test_generate_in_bf16_follows_the_in_process_bf16_engine(tiny_dir):
    """--dtype bfloat16 runs the model in bf16 (natively where the CPU has bf16 arithmetic, emulated elsewhere):
    the same tokens as the bf16 engine in this process."""
    out = run("generate", "--checkpoint", tiny_dir, "--prompt-ids", "5,6,7,8", "--max-tokens", 8, "--ignore-eos",
              "--json", "--dtype", "bfloat16")
    engine = LLMEngine(load_model(tiny_dir, dtype=torch.bfloat16))
    want = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    assert json.loads(out.stdout)["token_ids"] == want


def test_generate_samples_with_temperature_and_seed(tiny_dir):
    """--temperature samples, --seed reproduces the draw; another seed draws otherwise."""
    args = ["generate", "--checkpoint", tiny_dir, "--prompt-ids", "5,6,7", "--max-tokens", 24, "--ignore-eos",
            "--json"]
    draw = [json.loads(run(*args, "--temperature", 1.0, "--seed", seed).stdout)["token_ids"] for seed in (7, 7, 8)]
    greedy = json.loads(run(*args).stdout)["token_ids"]
    assert draw[0] == draw[1] and len(draw[0]) == 24
    assert draw[2] != draw[0] and draw[0] != greedy


def test_make_checkpoint_presets(tmp_path):
    out = run("make-checkpoint", "--preset", "gemma-4-26b-a4b", "--out", tmp_path / "real")
    assert "config only" in out.stdout
    cfg = json.loads((tmp_path / "real" / "config.json").read_text())
    assert cfg["text_config"]["global_head_dim"] == 512 and "per_layer_config" in cfg["text_config"]
    assert not list((tmp_path / "real").glob("*.safetensors"))
    run("make-checkpoint", "--preset", "tiny", "--out", tmp_path / "t", "--layout", "text-only", "--seed", 3)
    assert json.loads((tmp_path / "t" / "config.json").read_text())["architectures"] == ["Gemma4ForCausalLM"]
    assert (tmp_path / "t" / "model.safetensors").exists()


def one_line_error(done, command: str, status: int = 2) -> str:
    """The message of a command that failed as it should: one line on stderr, no traceback, the status."""
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"epserve {command}: error: "), done.stderr
    return done.stderr


def test_errors_are_one_line(tmp_path):
    bad = run("generate", "--checkpoint", tmp_path / "missing", "--prompt-ids", "1,2", check=False)
    assert "does not exist" in one_line_error(bad, "generate")
    bad = run("generate", "--prompt-ids", "1,x", check=False)
    assert bad.returncode == 2 and "comma-separated token ids" in bad.stderr


def test_expert_placement_errors_are_one_line_and_come_before_ray(tmp_path):
    builtin_checkpoint()  # made beforehand: making it prints progress, which is not what this test reads
    bad = run("generate", "--prompt-ids", "1,2", "--redundant-experts", 1, check=False)
    assert "add --shards N" in one_line_error(bad, "generate")
    (tmp_path / "placement.json").write_text(json.dumps({"shards": [[0, 1], [2]]}))
    bad = run("generate", "--prompt-ids", "1,2", "--shards", 2, "--expert-placement", tmp_path / "placement.json",
              check=False)
    assert "expert 3 (and 12 more) has no slot on any shard" in one_line_error(bad, "generate")
    assert "Ray" not in bad.stdout + bad.stderr
    bad = run("generate", "--prompt-ids", "1,2", "--frontends", 2, check=False)
    assert "add --shards N" in one_line_error(bad, "generate")
    bad = run("generate", "--prompt-ids", "1,2", "--shards", 2, "--frontends", 0, check=False)
    assert "frontends must be >= 1" in one_line_error(bad, "generate")
    bad = run("generate", "--prompt-ids", "1,2", "--rebalance-interval-s", 5, check=False)
    assert "add --shards N" in one_line_error(bad, "generate")
    bad = run("generate", "--prompt-ids", "1,2", "--shards", 2, "--rebalance-interval-s", -1, check=False)
    assert "rebalance_interval_s must be >= 0" in one_line_error(bad, "generate")
    bad = run("generate", "--prompt-ids", "1,2", "--shards", 2, "--rebalance-interval-s", 5, "--expert-placement",
              tmp_path / "placement.json", check=False)
    assert "cannot be used with a pinned" in one_line_error(bad, "generate")


def test_commands_need_the_input_their_synopsis_names():
    """No silent default prompt: generate needs --prompt-ids, client --prompt or --prompt-ids (one of them)."""
    bad = run("generate", "--max-tokens", 2, check=False)
    assert bad.returncode == 2 and "the following arguments are required: --prompt-ids" in bad.stderr
    bad = run("client", "--max-tokens", 2, check=False)
    assert bad.returncode == 2 and "one of the arguments --prompt --prompt-ids is required" in bad.stderr
    bad = run("client", "--prompt", "hi", "--prompt-ids", "1,2", check=False)
    assert bad.returncode == 2 and "not allowed with argument" in bad.stderr


def test_client_without_a_server_is_one_line(tmp_path):
    port = free_port()  # nothing listens there
    bad = run("client", "--address", f"127.0.0.1:{port}", "--prompt", "hi", "--timeout", 5, check=False)
    message = one_line_error(bad, "client", status=1)
    assert f"127.0.0.1:{port}: UNAVAILABLE" in message


def test_serve_with_a_bad_checkpoint_fails_before_ray_starts(tmp_path):
    (tmp_path / "empty").mkdir()
    for checkpoint, words in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "no config.json")):
        started = time.monotonic()
        bad = run("serve", "--checkpoint", checkpoint, "--grpc-port", free_port(), "--http-port", free_port(),
                  "--metrics-port", free_port(), check=False)
        assert words in one_line_error(bad, "serve")
        assert time.monotonic() - started < 30 and "Ray" not in bad.stdout + bad.stderr


def test_builtin_checkpoint_is_made_once_then_reused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EPSERVE_CACHE", str(tmp_path))
    path = builtin_checkpoint()
    assert path == tmp_path / "tiny-seed0" and "making the built-in 'tiny' checkpoint" in capsys.readouterr().err
    files = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-seed0"]  # the temporary directory was renamed
    assert builtin_checkpoint() == path
    assert capsys.readouterr().err == ""  # nothing made again ...
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == files  # ... or rewritten
    assert load_model(path).cfg == preset("tiny")  # complete: every tensor is there
