"""Incremental detokenization of one request's output, with stop strings.

Decoding: the tokenizer decodes a short sliding window of token ids, never the whole output.
The window is ``ids[prefix_offset:]``; the text of ``ids[prefix_offset:read_offset]`` (tokens
already turned into text) is decoded too, and only what the window adds beyond it is new.
Decoding a few tokens of context before the new ones keeps what depends on context right
(SentencePiece drops the leading space of a window's first token; it is then dropped from
both texts alike). New text that ends in U+FFFD (an incomplete UTF-8 sequence: a character
whose bytes are split across tokens) is held back until a later token completes it; when the
request ends it is flushed as is. The window starts with the last few prompt tokens, so the
first output token decodes in context too.

Stop strings: the text is matched against every stop string. At the first match the
request stops; the text returned excludes the stop string and everything after it (the
tokens that produced it are still part of the output token ids). Text that could be the
start of a stop string (a suffix of the text equal to a proper prefix of some stop string) is
held back until the next tokens resolve it: a stream therefore never shows any part of a
stop string. When the request ends for another reason, the held-back text is flushed.

Works with any object with ``decode(ids, skip_special_tokens=True) -> str`` (Ferry's
Tokenizer, a Hugging Face tokenizer, a test double).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

_REPLACEMENT = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5


class TokenDecoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class DetokenizedDelta:
    text: str  # new text, safe to show
    stop: str | None = None  # the stop string that matched: the request must finish


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas (not thread-safe)."""

    def __init__(self, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int] = (),
                 stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._text = ""  # decoded output text (cut at a stop string once matched)
        self._emitted = 0  # characters of _text returned so far
        self._stopped: str | None = None

    @property
    def text(self) -> str:
        """All text returned so far."""
        return self._text[: self._emitted]

    @property
    def stopped(self) -> str | None:
        """The stop string that ended the text, or None."""
        return self._stopped

    def add_tokens(self, token_ids: Sequence[int], final: bool = False) -> DetokenizedDelta:
        """Feed new output tokens; ``final`` when the request ends (flush held-back text)."""
        if self._stopped is not None:
            return DetokenizedDelta("", None)
        self._ids.extend(token_ids)
        self._text += self._decode_new(final)
        return self._release(final)

    def flush(self) -> DetokenizedDelta:
        """The request ended: return whatever was held back."""
        return self.add_tokens((), final=True)

    # ---------------------------------------------------------------- internals

    def _decode_new(self, final: bool) -> str:
        ids, po, ro = self._ids, self._prefix_offset, self._read_offset
        if len(ids) == ro and not final:
            return ""
        decode = self._tokenizer.decode
        prefix_text = decode(ids[po:ro], skip_special_tokens=self._skip_special) if ro > po else ""
        new_text = decode(ids[po:], skip_special_tokens=self._skip_special)
        if len(new_text) <= len(prefix_text):
            return ""
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""  # an incomplete character: wait for the token that completes it
        self._prefix_offset = ro
        self._read_offset = len(ids)
        return new_text[len(prefix_text):]

    def _release(self, final: bool) -> DetokenizedDelta:
        text, start = self._text, self._emitted
        if self._stop:
            best_pos, best_stop = -1, None
            for s in self._stop:
                pos = text.find(s, start)
                if pos != -1 and (best_pos == -1 or pos < best_pos):
                    best_pos, best_stop = pos, s
            if best_stop is not None:
                self._text = text[:best_pos]
                self._emitted = best_pos
                self._stopped = best_stop
                return DetokenizedDelta(text[start:best_pos], best_stop)
        end = len(text) if final else len(text) - self._held_back(text, start)
        self._emitted = end
        return DetokenizedDelta(text[start:end], None)

    def _held_back(self, text: str, start: int) -> int:
        """Length of the longest suffix of text[start:] that a stop string starts with."""
        longest = min(self._max_stop_len - 1, len(text) - start)
        for k in range(longest, 0, -1):
            tail = text[len(text) - k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0


__all__ = ["PROMPT_CONTEXT_TOKENS", "DetokenizedDelta", "IncrementalDetokenizer", "TokenDecoder"]
