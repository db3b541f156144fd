"""Per-request state that the scheduler and block manager own: plain Python, no torch.

A request's progress is two counters. `num_tokens` is every token known so far (prompt plus
generated); `num_computed_tokens` is how many of them have their K/V in the cache. Each step
the scheduler schedules some of the difference, within the token budget:

    prompt, first step      0 ......... 7 computed | 8 .............. 40 to compute
    prefix-cache hit        0 ..... 31 computed    | 32 ..... 40 to compute
    decode                  0 ................ 40 computed | 41 (the last sampled token)
    preempted (recompute)   computed reset to 0; prompt + output recomputed as one prefill

When a step computes up to `num_tokens`, the model's last logits are sampled and one token
is appended, so `num_tokens` moves one ahead again.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING_FOR_KV = "waiting_for_kv"  # its prompt's KV comes from a prefill engine
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # aborted by the caller (or client disconnect)
    ERROR = "error"  # a step failed because of this request; it alone was ended


class RequestOutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # an output every step, everything so far
    DELTA = "delta"  # an output every step, only what is new since the last (the server)
    FINAL_ONLY = "final_only"  # one output, when the request finishes (offline batches)


@dataclass(slots=True)
class SamplingParams:
    """What to generate and how; validated at construction (ValueError names the field)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # top-N logprobs per generated token
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token
    skip_special_tokens: bool = True
    # vLLM's: False leaves every output's text empty (token ids only, logprobs without
    # decoded_token); stop strings need it
    detokenize: bool = True
    # vLLM's; only True: tokenizers' fast decoding has no other way to join special tokens
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # token id -> a number in [-100, 100] added to its logit before sampling (OpenAI's and
    # vLLM's logit_bias; the logprobs returned stay the model's)
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's: sample only among these
    # vLLM's: keep only the prompt's last N tokens (the front is cut; offline, LLM.generate)
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # vLLM's arguments for custom sampling code (its logits-processor plugins); tandem loads
    # no such code, so only an empty dict is taken (anything else is a clear error)
    extra_args: dict[str, Any] | None = None
    # vLLM's: words never generated, each as written and after a space. A word of one token
    # is banned outright; a longer word's last token wherever the output ends with the rest.
    bad_words: list[str] | None = None
    # the words as token ids (InputProcessor fills it from the model's tokenizer; an init
    # field so that dataclasses.replace, which makes the n > 1 samples, carries it)
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False,
                                                         compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        ints = ("n", "top_k", "min_tokens") + (("seed",) if self.seed is not None else ()) \
            + (("max_tokens",) if self.max_tokens is not None else ())
        for name in ints:
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        checks = [
            ("n", self.n >= 1, "must be at least 1"),
            ("seed", self.seed is None or -2**63 <= self.seed < 2**64,
             "must be a 64-bit integer"),
            ("temperature", self.temperature >= 0.0, "must be non-negative"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be -1, 0 (off) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be positive"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "must be non-negative"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "must not exceed max_tokens"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "must be non-negative"),
            ("truncate_prompt_tokens", self.truncate_prompt_tokens is None
             or (type(self.truncate_prompt_tokens) is int and self.truncate_prompt_tokens >= 1),
             "must be a positive integer"),
            ("prompt_logprobs", self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             "must be non-negative"),
            ("stop", all(isinstance(s, str) and s for s in self.stop),
             "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and not isinstance(t, bool)
                                   for t in self.stop_token_ids), "must be integers"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")
        for name in ("detokenize", "spaces_between_special_tokens", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not self.detokenize and self.stop:
            raise ValueError("stop strings need detokenize=True (without text nothing can "
                             "match them); use stop_token_ids")
        if not self.spaces_between_special_tokens:
            raise ValueError("spaces_between_special_tokens=False is not supported: special "
                             "tokens are decoded by the tokenizer as they are")
        if self.bad_words is not None:
            if isinstance(self.bad_words, str) or not all(
                    isinstance(w, str) and w.strip() for w in self.bad_words):
                raise ValueError(f"bad_words must be a list of non-blank strings, got "
                                 f"{self.bad_words!r}")
            self.bad_words = list(self.bad_words)
        if self.extra_args:
            raise ValueError(f"extra_args is for custom sampling code (vLLM's logits-processor "
                             f"plugins), which tandem does not load; got {self.extra_args!r}")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
            if not self.allowed_token_ids or not all(
                    isinstance(t, int) and not isinstance(t, bool)
                    for t in self.allowed_token_ids):
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, "
                                 f"got {self.allowed_token_ids!r}")
        self.logit_bias = dict(self.logit_bias or {})
        for tok, bias in self.logit_bias.items():
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise ValueError(f"logit_bias keys must be token ids, got {tok!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                    or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got "
                                 f"{bias!r} for token {tok}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Repetition, presence or frequency penalty: sampling reads every earlier token."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        return self._bad_words_token_ids

    def set_bad_words_token_ids(self, ids: list[list[int]]) -> None:
        self._bad_words_token_ids = ids

    @property
    def reads_output_tokens(self) -> bool:
        """Sampling reads earlier output tokens on the host: penalties, or a bad word of
        more than one token (whether its last token is banned depends on the output)."""
        return self.has_penalties or any(len(w) > 1 for w in self._bad_words_token_ids or ())

    def bad_word_bans(self, output_token_ids: list[int]) -> list[int]:
        """The token ids bad_words bans as the next token after `output_token_ids`."""
        bans = []
        for word in self._bad_words_token_ids or ():
            k = len(word) - 1
            if k == 0 or (len(output_token_ids) >= k and output_token_ids[-k:] == word[:-1]):
                bans.append(word[-1])
        return bans


@dataclass(slots=True)
class Request:
    """One sequence being generated (a request with n > 1 becomes n of these)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()  # from generation_config / tokenizer
    arrival_time: float = field(default_factory=time.time)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_inflight_tokens: int = 0  # sampled by a launched step, not yet appended (async)
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache (-1: not yet known)
    # What the model runner holds of this request (sent in step plans): tokens from the
    # start, and block table entries (0 again after a preemption frees its blocks).
    num_sent_tokens: int = 0
    num_sent_blocks: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    # Speculative decoding: the proposer's guesses to verify next step, and this request's
    # running acceptance (drafted / accepted counts, for the switch and the metrics).
    spec_token_ids: list[int] = field(default_factory=list)
    num_drafted: int = 0
    num_accepted: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int | None = None) -> list[int]:
        """all_token_ids[start:end] (0 <= start), without building all of it: a decode
        step reads one token, a prefix-cache block block_size."""
        n = self.num_prompt_tokens
        if end is None:
            end = n + len(self.output_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]
