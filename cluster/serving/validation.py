"""The checks of request fields that both APIs (gRPC and OpenAI HTTP) share, made once, where a request comes
in: a bad field raises ``RequestError`` naming it (INVALID_ARGUMENT / HTTP 400), so that no input can reach the
engine in a shape that would fail a step. Each API names the fields its own way (``renamed``):
``sampling.max_tokens`` over gRPC, ``max_tokens`` over HTTP.

Besides the model's own limits (``ModelInfo``: vocabulary, context length) a few caps keep what one request
costs the server bounded: a message of at most ``MAX_MESSAGE_BYTES``, a text prompt of at most
``TEXT_CHARS_PER_TOKEN`` characters per token of context (checked before tokenizing it), at most
``MAX_STOP_TOKEN_IDS`` stop token ids and ``MAX_STOP_STRINGS`` stop strings, a request id of visible ASCII.
"""

from __future__ import annotations

import re

from epserve.actors.engine.sampling import RequestError, SamplingParams
from epserve.actors.model_info import ModelInfo

MAX_MESSAGE_BYTES = 4 << 20  # a gRPC message or an HTTP body
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: safe in logs and headers
TEXT_CHARS_PER_TOKEN = 16
MAX_STOP_TOKEN_IDS = 256
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed accepts


def request_id(value: str, name: str = "request_id") -> str:
    if not REQUEST_ID.fullmatch(value):
        raise RequestError(name, "must be 1 to 128 visible ASCII characters (no spaces or control characters)")
    return value


def text(value: str, info: ModelInfo, name: str = "prompt") -> str:
    """A text prompt: not empty, valid Unicode (JSON allows lone surrogates; tokenizers refuse them), and not so
    long that it could not fit the context whatever it tokenizes to."""
    if not value:
        raise RequestError(name, "is empty")
    most = TEXT_CHARS_PER_TOKEN * info.max_model_len
    if len(value) > most:
        raise RequestError(name, f"has {len(value)} characters, more than the {most} that the context length "
                                 f"{info.max_model_len} allows ({TEXT_CHARS_PER_TOKEN} per token)")
    return unicode(value, name)


def unicode(value: str, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(name, f"is not valid Unicode: {e.reason} at character {e.start}") from None
    return value


def token_ids(ids: list[int], info: ModelInfo, name: str = "prompt") -> list[int]:
    if not ids:
        raise RequestError(name, "is empty")
    if len(ids) >= info.max_model_len:
        raise RequestError(name, f"has {len(ids)} tokens: with any output that exceeds the context length "
                                 f"{info.max_model_len}")
    bad = [t for t in ids if not 0 <= t < info.vocab_size]
    if bad:
        raise RequestError(name, f"token ids {bad[:5]} are outside the vocabulary [0, {info.vocab_size})")
    return list(ids)


def stop_strings(stop: list[str], name: str = "stop") -> list[str]:
    """Stop strings: a bounded number of bounded ones (empty ones mean nothing and are dropped)."""
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise RequestError(name, f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
    return [s for s in stop if s]


def sampling(info: ModelInfo, **fields) -> SamplingParams:
    """The engine's SamplingParams, checked (``fields``: any of its fields; the rest keep their defaults)."""
    params = SamplingParams(**fields)
    params.validate(info.vocab_size)
    if params.seed is not None and not SEED_RANGE[0] <= params.seed < SEED_RANGE[1]:
        raise RequestError("seed", f"must be in [-2**63, 2**64), got {params.seed}")
    if params.max_tokens >= info.max_model_len:
        raise RequestError("max_tokens", f"{params.max_tokens} leaves no room for the prompt in the context "
                                         f"length {info.max_model_len}")
    stops = set(params.stop_token_ids)
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError("stop_token_ids", f"{len(params.stop_token_ids)} ids: at most {MAX_STOP_TOKEN_IDS}")
    if params.min_tokens and len(stops | set(info.eos_token_ids)) >= info.vocab_size:
        raise RequestError("stop_token_ids", "with min_tokens, the stop ids may not cover the whole vocabulary")
    return params


def renamed(error: RequestError, names: dict[str, str]) -> RequestError:
    """The same error under an API's own name for its field (``names``: engine field -> API field)."""
    name = names.get(error.field, error.field)
    return error if name == error.field else RequestError(name, error.message)
