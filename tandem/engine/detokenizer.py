"""Incremental detokenization and stop strings, one instance per generated sequence.

Byte-level BPE splits multi-byte characters across tokens, so decoding token by token would
emit broken UTF-8. We decode a short window and emit only text that is final:

    ids      ... p p p | o o o o | n        p: context (prompt tail), o: emitted, n: new
                prefix_offset   read_offset
    delta = decode(ids[prefix:]) minus decode(ids[prefix:read]), held back while it ends
    in U+FFFD (an incomplete character).

Stop strings are matched on the accumulated text, once min_tokens tokens are out (as EOS
and stop tokens are); while a stop string could still be completed by the next token, the
last `max_stop_len - 1` characters are withheld from streaming so no client ever sees part
of a stop string.
"""

from __future__ import annotations

from tandem.engine.tokenizer import Tokenizer
from tandem.request import SamplingParams

_CONTEXT_TOKENS = 5  # prompt tokens decoded as left context (for tokenizers that strip spaces)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int],
                 params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special = params.skip_special_tokens
        self.stop = list(params.stop or [])
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.num_tokens = 0  # output tokens added
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all final text so far (after stop truncation)
        self.num_streamed = 0  # characters of `text` already handed out as deltas
        self.stop_reason: str | None = None  # the stop string that matched

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add_tokens(self, new_ids: list[int], finished: bool) -> bool:
        """Append tokens; returns True when a stop string matched (the caller finishes)."""
        for tok in new_ids:
            self.ids.append(tok)
            self.num_tokens += 1
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self._append(full[len(prefix):])
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.stop_reason is not None:
                return True
        if finished and self.read_offset < len(self.ids):  # flush an incomplete tail
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self._append(self._decode(self.ids[self.prefix_offset:])[len(prefix):])
            self.read_offset = len(self.ids)
        return self.stop_reason is not None

    def _append(self, delta: str) -> None:
        self.text += delta
        if not self.stop or self.num_tokens < self.min_tokens:
            return
        start = max(0, len(self.text) - len(delta) - self._max_stop + 1)
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1:
                self.stop_reason = s
                self.text = self.text[: idx + len(s) if self.include_stop else idx]
                return

    def take_delta(self, finished: bool) -> str:
        """Text not yet streamed, withholding what could still become a stop string."""
        end = len(self.text)
        if not finished and self.stop and self.stop_reason is None:
            end = max(self.num_streamed, end - self._max_stop + 1)
        delta = self.text[self.num_streamed:end]
        self.num_streamed = end
        return delta
