"""The ``epserve`` command line: make-checkpoint and generate, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

EPSERVE = [sys.executable, "-m", "epserve.cluster.cli"]


def run(*args, check=True):
    return subprocess.run([*EPSERVE, *map(str, args)], capture_output=True, text=True, timeout=300, check=check)


def test_generate_matches_transformers_greedy(tiny_dir):
    prompts = [[2, 17, 300, 42], [5, 6, 7, 8, 9, 10, 11] * 7, [100]]
    args = [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]
    out = run("generate", "--checkpoint", tiny_dir, *args, "--max-tokens", 32, "--ignore-eos", "--json")
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == len(prompts)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    for prompt, line in zip(prompts, lines):
        with torch.no_grad():
            r = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             eos_token_id=None, output_scores=True, return_dict_in_generate=True)
        scores = torch.stack(r.scores)[:, 0]
        top2 = scores.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-5 * scores.abs().max(), "near-tie: pick another prompt"
        assert line == {"token_ids": r.sequences[0, len(prompt):].tolist(), "finish_reason": "length"}


def test_make_checkpoint_presets(tmp_path):
    out = run("make-checkpoint", "--preset", "gemma-4-26b-a4b", "--out", tmp_path / "real")
    assert "config only" in out.stdout
    cfg = json.loads((tmp_path / "real" / "config.json").read_text())
    assert cfg["text_config"]["global_head_dim"] == 512 and "per_layer_config" in cfg["text_config"]
    assert not list((tmp_path / "real").glob("*.safetensors"))
    run("make-checkpoint", "--preset", "tiny", "--out", tmp_path / "t", "--layout", "text-only", "--seed", 3)
    assert json.loads((tmp_path / "t" / "config.json").read_text())["architectures"] == ["Gemma4ForCausalLM"]
    assert (tmp_path / "t" / "model.safetensors").exists()


def test_errors_are_one_line(tmp_path):
    bad = run("generate", "--checkpoint", tmp_path / "missing", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
    bad = run("generate", "--prompt-ids", "1,x", check=False)
    assert bad.returncode == 2 and "comma-separated token ids" in bad.stderr
