"""The OpenAI API's response bodies. One ``Answer`` per request writes its choices, whole or streamed as
server-sent events (the same builder for both), with the logprob formats of completions and of chat, and the
usage."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi.responses import StreamingResponse

from ..text_stream import TextStream
from ..tokenizer import Tokenizer


@dataclass
class Answer:
    request_id: str
    chat: bool
    model: str
    prompt_tokens: int
    text: TextStream  # the tokens and text so far
    tokenizer: Tokenizer | None
    logprobs: bool
    return_token_ids: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def choice(self, piece: str, start: int, end: int, finish: str | None, streamed: bool) -> dict:
        """The choice for the text ``piece`` of tokens [start, end): a chunk's when ``streamed``."""
        c: dict[str, Any] = {"index": 0}
        if self.chat and streamed:
            c["delta"] = {"content": piece} if piece else {}
        elif self.chat:
            c["message"] = {"role": "assistant", "content": piece, "refusal": None}
        else:
            c["text"] = piece
        c["logprobs"] = self._logprobs(start, end) if self.logprobs and end > start else None
        c["finish_reason"] = finish
        if self.return_token_ids:
            c["token_ids"] = self.text.token_ids[start:end]
        return c

    def whole(self) -> dict:
        """The body of a request that is not streamed."""
        n = len(self.text.token_ids)
        body = self._envelope("chat.completion" if self.chat else "text_completion",
                              [self.choice(self.text.final_text, 0, n, self.text.finish_reason, streamed=False)])
        return {**body, "usage": self.usage()}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        """One server-sent event of a streamed request."""
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", choices)
        if self.include_usage:
            body["usage"] = usage
        return sse(body)

    def role_chunk(self) -> str:
        """A streamed chat's first event."""
        return self.chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}])

    def usage(self) -> dict:
        n = len(self.text.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        body = {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}
        return {**body, "system_fingerprint": None} if self.chat else body

    def _logprobs(self, start: int, end: int) -> dict:
        ids, lps = self.text.token_ids[start:end], self.text.logprobs[start:end]
        if self.chat:
            return {"content": [{"token": self._token(t), "logprob": lp, "bytes": self._bytes(t), "top_logprobs": []}
                                for t, lp in zip(ids, lps)], "refusal": None}
        return {"tokens": [self._token(t) for t in ids], "token_logprobs": lps, "top_logprobs": None,
                "text_offset": self.text.offsets[start:end]}

    def _token(self, token: int) -> str:
        return self.tokenizer.token_text(token) if self.tokenizer else f"token_id:{token}"

    def _bytes(self, token: int) -> list[int]:
        return list(self.tokenizer.token_bytes(token)) if self.tokenizer else []


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class SSEResponse(StreamingResponse):
    """Closes the event generator when the response ends for any reason (a client that went away included),
    shielded from the cancellation, so that the engine request is aborted at once."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.move_on_after(10, shield=True):
                await self.body_iterator.aclose()
