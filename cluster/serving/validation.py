"""The checks of request fields that both APIs (gRPC and OpenAI HTTP) share, made before a request reaches the
engine (which checks again): a bad field raises ``RequestError`` naming it (INVALID_ARGUMENT / HTTP 400), so
that no input can reach the engine in a shape that would fail a step. Each API names the fields its own way
(``field_names``): ``sampling.max_tokens`` over gRPC, ``max_tokens`` over HTTP.

Besides the model's own limits (vocabulary, context length) a few caps keep what one request costs the
server bounded: a text prompt of at most ``TEXT_CHARS_PER_TOKEN`` characters per token of context (checked
before tokenizing it), at most ``MAX_STOP_TOKEN_IDS`` stop token ids, a request id of visible ASCII.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from epserve.actors.engine.sampling import RequestError, SamplingParams

REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: safe in logs and headers
TEXT_CHARS_PER_TOKEN = 16
MAX_STOP_TOKEN_IDS = 256
SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class Limits:
    """What a request is checked against: the served model's limits (``Frontend.model_info()``)."""

    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, info: dict) -> Limits:
        return cls(int(info["vocab_size"]), int(info["max_model_len"]), tuple(info.get("eos_token_ids") or ()))


def request_id(value: str, name: str = "request_id") -> str:
    if not REQUEST_ID.fullmatch(value):
        raise RequestError(name, "must be 1 to 128 visible ASCII characters (no spaces or control characters)")
    return value


def text(value: str, limits: Limits, name: str = "prompt") -> str:
    """A text prompt: not empty, valid Unicode (JSON allows lone surrogates; tokenizers refuse them), and not so
    long that it could not fit the context whatever it tokenizes to."""
    if not value:
        raise RequestError(name, "is empty")
    most = TEXT_CHARS_PER_TOKEN * limits.max_model_len
    if len(value) > most:
        raise RequestError(name, f"has {len(value)} characters, more than the {most} that the context length "
                                 f"{limits.max_model_len} allows ({TEXT_CHARS_PER_TOKEN} per token)")
    return unicode(value, name)


def unicode(value: str, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(name, f"is not valid Unicode: {e.reason} at character {e.start}") from None
    return value


def token_ids(ids: list[int], limits: Limits, name: str = "prompt") -> list[int]:
    if not ids:
        raise RequestError(name, "is empty")
    if len(ids) >= limits.max_model_len:
        raise RequestError(name, f"has {len(ids)} tokens: with any output that exceeds the context length "
                                 f"{limits.max_model_len}")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise RequestError(name, f"token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})")
    return list(ids)


def sampling(limits: Limits, **fields) -> dict:
    """The engine's SamplingParams fields, checked (``fields``: any of SamplingParams' fields; the rest keep
    their defaults). Returns them as a dict for ``FrontendClient.stream``."""
    params = SamplingParams(**fields)
    params.validate(limits.vocab_size)
    if params.seed is not None and not SEED_RANGE[0] <= params.seed < SEED_RANGE[1]:
        raise RequestError("seed", f"must be in [-2**63, 2**64), got {params.seed}")
    if params.max_tokens >= limits.max_model_len:
        raise RequestError("max_tokens", f"{params.max_tokens} leaves no room for the prompt in the context "
                                         f"length {limits.max_model_len}")
    stops = set(params.stop_token_ids)
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError("stop_token_ids", f"{len(params.stop_token_ids)} ids: at most {MAX_STOP_TOKEN_IDS}")
    if params.min_tokens and len(stops | set(limits.eos_token_ids)) >= limits.vocab_size:
        raise RequestError("stop_token_ids", "with min_tokens, the stop ids may not cover the whole vocabulary")
    return {name: getattr(params, name) for name in ("max_tokens", "temperature", "top_k", "top_p", "seed",
                                                     "stop_token_ids", "ignore_eos", "min_tokens", "logprobs")}


def renamed(error: RequestError, names: dict[str, str]) -> RequestError:
    """The same error under an API's own name for its field (``names``: engine field -> API field)."""
    name = names.get(error.field, error.field)
    return error if name == error.field else RequestError(name, error.message)
