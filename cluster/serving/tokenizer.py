"""Text in and out for the servers: a checkpoint's tokenizer.json (the ``tokenizers`` library), its chat template
(jinja2, rendered as transformers renders it) and an incremental detokenizer for streaming.

The checkpoints from ``epserve make-checkpoint`` carry a small byte-level BPE tokenizer (see
``cluster/fixtures/tokenizer_files.py``); a released checkpoint's own tokenizer.json and chat template work the
same.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as _Backend


class ChatTemplateError(ValueError):
    """The chat template refused the messages (e.g. roles that do not alternate)."""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, inverted (what the ByteLevel pre-tokenizer writes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _token_content(token: Any) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


class Tokenizer:
    """A checkpoint's tokenizer: ``encode``, ``decode``, ``apply_chat_template`` and ``detokenizer()``."""

    def __init__(self, backend: _Backend, config: dict | None = None, chat_template: str | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template
        self.bos_token = _token_content(self.config.get("bos_token", "<bos>"))
        self.eos_token = _token_content(self.config.get("eos_token", "<eos>"))
        self.bos_token_id = backend.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = backend.token_to_id(self.eos_token) if self.eos_token else None
        decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
        self._byte_level = "ByteLevel" in kinds
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}

    # ---- loading ----------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer | None:
        """The tokenizer in a checkpoint directory; None when it has no tokenizer.json."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        backend = _Backend.from_file(str(path / "tokenizer.json"))
        config = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not template and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if not template and (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        return cls(backend, config, template or None)

    # ---- text <-> ids -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` as transformers' ``AutoTokenizer`` makes them: special-token strings in it (like
        ``<start_of_turn>``) become their ids, and, with ``add_special_tokens``, the tokenizer's own rules (its
        post-processor: ``<bos>`` in front for Gemma's) add what they add."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_text(self, token_id: int) -> str:
        """One token as text on its own (a piece of a multi-byte character shows as U+FFFD)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's ``bytes`` field of a logprob)."""
        token = self.backend.id_to_token(token_id)
        if token is None:
            return b""
        if token_id in self._special_ids:
            return token.encode("utf-8")
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in token):
                return bytes(table[c] for c in token)
            return token.encode("utf-8")
        m = _BYTE_FALLBACK.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8")  # SentencePiece's word-boundary mark

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)

    # ---- chat -------------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @cached_property
    def _compiled_template(self):
        def raise_exception(message):
            raise ChatTemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        # the environment transformers renders chat templates in
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text of a conversation (it starts with ``<bos>`` when the template writes it: encode it
        with ``add_special_tokens=False``). Raises ChatTemplateError when the template refuses the messages."""
        if not self.chat_template:
            raise ChatTemplateError("this tokenizer has no chat template")
        special = {k: _token_content(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token",
                                                                   "unk_token")}
        try:
            return self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  **{**{k: v for k, v in special.items() if v}, **kwargs})
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed: {e}") from e
        except (TypeError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template cannot render these messages: {e}") from e


class IncrementalDetokenizer:
    """Streams the text of a growing list of token ids.

    ``step(new_ids)`` returns the text those ids add, holding back an incomplete UTF-8 character (decoded as
    U+FFFD) until the tokens that complete it arrive; ``flush()`` returns whatever is still held back at the
    end. The pieces joined equal ``tokenizer.decode(all ids)``. Each step decodes only the ids since the last
    clean character boundary.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # what step/flush returned so far
        self._prefix = 0  # ids[_prefix:_read] decode to the last piece returned (a clean boundary at _prefix)
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens) if ids else ""

    def step(self, new_ids: Iterable[int]) -> str:
        self.token_ids.extend(new_ids)
        prefix_text = self._decode(self.token_ids[self._prefix:self._read])
        new_text = self._decode(self.token_ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.token_ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        prefix_text = self._decode(self.token_ids[self._prefix:self._read])
        new_text = self._decode(self.token_ids[self._prefix:])
        piece = new_text[len(prefix_text):]
        self._prefix = self._read = len(self.token_ids)
        self.text += piece
        return piece
