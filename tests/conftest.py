"""Shared fixtures for the model-core tests.

Every checkpoint is built once per session under ``tmp_path_factory``; the sizes are tiny (hidden <= 256, <= 6
layers, vocabulary <= 1024) so the whole suite runs in seconds on two CPU cores.

Parity rule used everywhere (never loosen it): fp32 logits at every position must satisfy
``max|ours - transformers| <= 1e-5 * max|transformers logit|``, with the transformers reference run with
``attn_implementation="eager"``.
"""

from __future__ import annotations

import os

# Ray on one machine: every port on 127.0.0.1 (read when ray is imported), no usage reporting, gloo on lo
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import dataclasses  # noqa: E402
import math
import shutil
import types

import pytest
import torch

from epserve.actors.model import host_memory
from epserve.actors.model.attention import WholeSequence
from epserve.actors.model.loader import load_model
from epserve.cluster.fixtures.checkpoint import preset, write_checkpoint

from helpers import missing_tools_line

torch.set_num_threads(2)

REL_TOL = 1e-5  # the acceptance tolerance, relative to the largest reference logit
TINY_SEED = 1234


@pytest.fixture(autouse=True, scope="module")
def _freed_memory_given_back():
    """After each test module: this process loads and drops many models, and glibc keeps what they freed
    (host_memory.keep_freed_memory, for servers); the Ray actors of the next module need that memory."""
    yield
    host_memory.give_back_freed_memory()


# --------------------------------------------------------------------------------------------- helpers


def our_logits(model_or_dir, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, V] of our model (a loaded model or a checkpoint directory) on one sequence ``ids`` [T]."""
    model = load_model(model_or_dir) if not isinstance(model_or_dir, torch.nn.Module) else model_or_dir
    T = ids.shape[0]
    pos = torch.arange(T)
    with torch.no_grad():
        return model.logits(model(ids, pos, WholeSequence(pos)))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, V] of a transformers model on one sequence ``ids`` [T]."""
    with torch.no_grad():
        return model(input_ids=ids[None], use_cache=False).logits[0].float()


def parity_error(ref: torch.Tensor, ours: torch.Tensor) -> tuple[float, float]:
    """(max|Δ|, allowed) for the acceptance rule."""
    assert ref.shape == ours.shape, f"logit shapes differ: {tuple(ref.shape)} vs {tuple(ours.shape)}"
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    return (ref - ours).abs().max().item(), REL_TOL * ref.abs().max().item()


def assert_parity(ref: torch.Tensor, ours: torch.Tensor, what: str = "") -> None:
    diff, allowed = parity_error(ref, ours)
    assert diff <= allowed, f"{what}: max|Δlogits| = {diff:.3e} > 1e-5 * max|logit| = {allowed:.3e}"


def hf_load(cls, path):
    """A transformers model from a checkpoint, fp32 on CPU, eager attention, eval mode."""
    return cls.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32).eval()


def randomize_hf_(model, seed: int) -> None:
    """Give every parameter of a freshly built transformers Gemma 4 model a meaningful random value: matrices
    ~N(0, 1/fan_in) (the embedding wider, so logits reach the soft-cap range), every 1-D weight (norms,
    router.scale, router.per_expert_scale) uniform in [0.5, 1.5] and layer_scalar in [0.5, 1.0], so that a
    wrong norm convention, a dropped scale or a dropped layer_scalar shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.get_text_config().hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 3.0 / math.sqrt(hidden))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.empty(b.shape).uniform_(0.5, 1.0, generator=gen))


def random_ids(vocab: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation of ``prompt`` (eos ignored). Random weights can make near-ties, where
    a difference within the parity tolerance may legitimately pick the other token: this asserts that the top-2
    margin of the reference logits exceeds the tolerance at every generated position (on failure, pick another
    prompt or seed, never a looser check)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits)[:, 0].float()  # [new, V]
    top2 = logits.topk(2, dim=-1).values
    margin, allowed = (top2[:, 0] - top2[:, 1]).min().item(), REL_TOL * logits.abs().max().item()
    assert margin > allowed, f"near-tie in the reference (top-2 margin {margin:.2e} <= {allowed:.2e})"
    return out.sequences[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def tools():
    """The helpers above, for the test modules (no ``import conftest``)."""
    return types.SimpleNamespace(
        our_logits=our_logits, hf_logits=hf_logits, parity_error=parity_error, assert_parity=assert_parity,
        hf_load=hf_load, randomize_hf_=randomize_hf_, random_ids=random_ids, hf_greedy=hf_greedy, REL_TOL=REL_TOL,
    )


# --------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="session")
def tiny_cfg():
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_cfg):
    """write_checkpoint(preset('tiny')) in the released layout: one model.safetensors, bf16."""
    return write_checkpoint(tiny_cfg, tmp_path_factory.mktemp("tiny-released"), seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_text_only_dir(tmp_path_factory, tiny_cfg):
    return write_checkpoint(tiny_cfg, tmp_path_factory.mktemp("tiny-text-only"), seed=TINY_SEED, layout="text-only")


@pytest.fixture(scope="session")
def tiny_sharded_dir(tmp_path_factory, tiny_cfg):
    """The same weights as ``tiny_dir`` (same seed), split into ~1 MiB shards with model.safetensors.index.json."""
    return write_checkpoint(tiny_cfg, tmp_path_factory.mktemp("tiny-sharded"), seed=TINY_SEED, shard_bytes=1 << 20)


@pytest.fixture(scope="session")
def shared_expert_dir(tmp_path_factory, tiny_cfg):
    """The tiny preset with a separate shared expert of width 192 in every layer (the released model has none)."""
    cfg = dataclasses.replace(tiny_cfg, shared_expert_intermediate_size=192)
    return write_checkpoint(cfg, tmp_path_factory.mktemp("tiny-shared-expert"), seed=TINY_SEED)


@pytest.fixture(scope="session")
def short_context_dir(tmp_path_factory, tiny_cfg):
    """The tiny preset trained, as its config.json says, for 2048 positions (the released model: 262144)."""
    cfg = dataclasses.replace(tiny_cfg, max_position_embeddings=2048)
    return write_checkpoint(cfg, tmp_path_factory.mktemp("tiny-short-context"), seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return load_model(tiny_dir)


@pytest.fixture
def broken_copy(tmp_path, tiny_dir):
    """A function returning a fresh copy of the tiny checkpoint to damage."""

    def make(name: str = "broken"):
        return shutil.copytree(tiny_dir, tmp_path / name)

    return make


# --------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray head for the whole run (every port on 127.0.0.1), shut down at the end. It advertises the
    role resources of the Helm chart's pods, enough for one 2-shard cluster that asks for them."""
    import ray

    ray.init(namespace="epserve", include_dashboard=False, log_to_driver=False,
             resources={"frontend": 1, "expert": 2}, runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}})
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate valid for 127.0.0.1 and localhost, and its private key: PEM file paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (folder / "key.pem").chmod(0o600)
    return types.SimpleNamespace(cert=str(folder / "cert.pem"), key=str(folder / "key.pem"))


# --------------------------------------------------------------------------------------------- summary


def pytest_terminal_summary(terminalreporter):
    """The run's last words: which tests skipped for want of a program, and how to get it (one line)."""
    reasons = [str(r.longrepr[2] if isinstance(r.longrepr, tuple) else r.longrepr)
               for r in terminalreporter.stats.get("skipped", [])]
    line = missing_tools_line(reasons)
    if line:
        terminalreporter.write_line(line, yellow=True)
