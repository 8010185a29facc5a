"""One request's output as the servers send it (gRPC and OpenAI HTTP alike): its tokens, their text decoded as
they come, and stop strings.

``add(out)`` takes what an engine step produced and returns the text that may be sent now: text that could
still turn out to be the start of a stop string is held back (at most the longest stop string less one
character), and the text ends before the first stop string found; the output is then ``done`` with finish
reason ``stop``, and the caller leaves the engine's stream (which aborts the request).
"""

from __future__ import annotations

from epserve.actors.engine.engine import RequestOutput

from .tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer | None, stop: list[str] = (), skip_special_tokens: bool = True):
        self.detok = tokenizer.detokenizer(skip_special_tokens) if tokenizer is not None else None
        self.stop = list(stop)
        self.hold = max(map(len, self.stop), default=1) - 1
        self.text = ""  # decoded so far (may run past a stop string)
        self.sent = 0  # characters of ``text`` released
        self.token_ids: list[int] = []
        self.logprobs: list[float | None] = []
        self.offsets: list[int] = []  # where each token's text starts
        self.finish_reason: str | None = None
        self.done = False

    def add(self, out: RequestOutput) -> str:
        """The text to send for this step's tokens (appended to ``token_ids``)."""
        ids = out.new_token_ids
        for token, lp in zip(ids, out.new_logprobs or [None] * len(ids)):
            self.offsets.append(len(self.text))
            self.token_ids.append(token)
            self.logprobs.append(lp)
            if self.detok:
                self.text += self.detok.step([token])
        if out.finished:
            if self.detok:
                self.text += self.detok.flush()
            self.finish_reason, self.done = out.finish_reason, True
        return self._release()

    def _release(self) -> str:
        end = len(self.text) if self.done else max(self.sent, len(self.text) - self.hold)
        if self.stop:
            start = max(0, self.sent - self.hold)
            hits = [p for p in (self.text.find(s, start) for s in self.stop) if p >= 0]
            if hits:
                end = max(self.sent, min(hits))
                self.finish_reason, self.done = "stop", True
        piece = self.text[self.sent:end]
        self.sent = end
        return piece

    @property
    def final_text(self) -> str:
        return self.text[:self.sent]
