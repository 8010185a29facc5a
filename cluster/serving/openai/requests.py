"""The OpenAI API's request bodies as pydantic models, ``CompletionRequest`` and ``ChatRequest``.

Each field is checked as OpenAI (or vLLM, for its extensions top_k, min_tokens, ignore_eos, stop_token_ids,
skip_special_tokens, add_special_tokens, return_token_ids) defines it, with a message that names it. A null
counts as absent, fields not listed are ignored, and fields that would change the result but are not
implemented (n > 1, penalties, logit_bias, echo, suffix, tools, JSON response formats) are refused. What depends
on the served model (the prompt against its tokenizer and context, the sampling limits) the routes check with
validation.py.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Callable

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo, model_validator

from .. import validation

ROLES = ("system", "user", "assistant")  # "developer" is OpenAI's newer name of "system"


def _shown(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(v, info: ValidationInfo) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise ValueError(f"{info.field_name} must be an integer, got {_shown(v)}")
    return v


def _float(v, info: ValidationInfo) -> float:
    try:
        finite = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise ValueError(f"{info.field_name} must be a finite number, got {_shown(v)}")
    return float(v)


def _bool(v, info: ValidationInfo) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{info.field_name} must be true or false, got {_shown(v)}")
    return v


def _object(v, info: ValidationInfo) -> dict:
    if not isinstance(v, dict):
        raise ValueError(f"{info.field_name} must be an object")
    return v


def _token_ids(v, info: ValidationInfo) -> list[int]:
    if not isinstance(v, list) or not all(_is_int(t) for t in v):
        raise ValueError(f"{info.field_name} must be a list of token ids")
    return v


def _stop(v, info: ValidationInfo) -> list[str]:
    stop = [v] if isinstance(v, str) else v
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError("stop must be a string or a list of strings")
    return validation.stop_strings(stop)


def _only(ok: Callable[[Any], bool], message: str) -> BeforeValidator:
    """A field that is not implemented beyond the values ``ok`` accepts: anything else is refused."""

    def check(v):
        if not ok(v):
            raise ValueError(message)
        return v

    return BeforeValidator(check)


Int = Annotated[int, BeforeValidator(_int)]
Float = Annotated[float, BeforeValidator(_float)]
Bool = Annotated[bool, BeforeValidator(_bool)]


class _Request(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    stream: Bool = False
    stream_options: Annotated[dict, BeforeValidator(_object)] = {}
    max_tokens: Int | None = None
    temperature: Float = 1.0  # OpenAI's default
    top_p: Float = 1.0
    top_k: Int = 0  # 0 (or vLLM's -1): off
    seed: Int | None = None
    min_tokens: Int = 0
    stop: Annotated[list[str], BeforeValidator(_stop)] = []
    stop_token_ids: Annotated[list[int], BeforeValidator(_token_ids)] = []
    ignore_eos: Bool = False
    skip_special_tokens: Bool = True
    return_token_ids: Bool = False
    n: Annotated[Any, _only(lambda v: v == 1, "n must be 1: one choice per request is supported")] = None
    best_of: Annotated[Any, _only(lambda v: v == 1, "best_of must be 1")] = None
    presence_penalty: Annotated[Any, _only(lambda v: v == 0, "presence_penalty is not supported (only 0)")] = None
    frequency_penalty: Annotated[Any, _only(lambda v: v == 0, "frequency_penalty is not supported (only 0)")] = None
    repetition_penalty: Annotated[Any, _only(lambda v: v == 1, "repetition_penalty is not supported (only 1)")] = None
    logit_bias: Annotated[Any, _only(lambda v: not v, "logit_bias is not supported")] = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @property
    def include_usage(self) -> bool:
        return self.stream and bool(self.stream_options.get("include_usage"))

    def sampling_fields(self, max_tokens: int, logprobs: bool) -> dict:
        """The engine's SamplingParams fields (validation.sampling checks them against the model)."""
        return dict(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=0 if self.top_k == -1 else self.top_k, seed=self.seed, min_tokens=self.min_tokens,
                    stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs)


def _prompt(v, info: ValidationInfo) -> str | list[int]:
    """Text or token ids; a list of one of those is that one (batches are not supported)."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str) or (isinstance(v, list) and all(_is_int(t) for t in v)):
        return v
    if isinstance(v, list) and all(isinstance(p, (str, list)) for p in v):
        raise ValueError("batched prompts are not supported: send one prompt per request")
    raise ValueError("prompt must be a string, a list of token ids, or a list of one of those")


def _logprobs_0_or_1(v, info: ValidationInfo) -> int:
    n = _int(v, info)
    if n not in (0, 1):
        raise ValueError("logprobs must be 0 or 1: only the chosen tokens' logprobs are available")
    return n


class CompletionRequest(_Request):
    prompt: Annotated[Any, BeforeValidator(_prompt)]
    logprobs: Annotated[int | None, BeforeValidator(_logprobs_0_or_1)] = None
    add_special_tokens: Bool = True  # the tokenizer's own (a <bos> in front for Gemma)
    echo: Annotated[Any, _only(lambda v: not v, "echo is not supported")] = None
    suffix: Annotated[Any, _only(lambda v: not v, "suffix is not supported")] = None


def _messages(v, info: ValidationInfo) -> list[dict]:
    """[{role, content}] with text content only."""
    if not isinstance(v, list) or not v:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a role")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: role {m['role']!r} is not supported ({', '.join(ROLES)})")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"messages[{i}]: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": role, "content": validation.unicode(content, f"messages[{i}].content")})
    return out


def _text_format(v) -> bool:
    return v == {} or (isinstance(v, dict) and v.get("type") == "text")


class ChatRequest(_Request):
    messages: Annotated[Any, BeforeValidator(_messages)]
    logprobs: Bool = False
    top_logprobs: Annotated[Any, _only(lambda v: v == 0, "top_logprobs is not supported (only the chosen "
                                                         "tokens' logprobs)")] = None
    max_completion_tokens: Int | None = None
    tools: Annotated[Any, _only(lambda v: not v, "tools are not supported")] = None
    response_format: Annotated[Any, _only(_text_format, 'response_format: only {"type": "text"} is '
                                                        'supported')] = None
