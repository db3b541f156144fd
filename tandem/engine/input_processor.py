"""`InputProcessor`: everything about a request that needs the model's files but not its
weights: the tokenizer, the resolved limits (max_model_len, vocabulary), validation that
names the field, and the sampling defaults of generation_config.json.

The engine holds one; a front end in another process (engine/core_process.py) builds its
own from the same config, so requests are tokenized and checked before they cross over.
"""

from __future__ import annotations

import logging
import os

from tandem.config import EngineConfig
from tandem.engine.generation_config import sampling_defaults
from tandem.engine.tokenizer import Tokenizer
from tandem.models.loader import read_hf_config
from tandem.request import SamplingParams

PromptType = str | list[int] | dict

logger = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """A prompt (with its completion budget) that does not fit max_model_len; `param`
    names the field to shorten."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # picklable across the engine process boundary
        return ContextLengthError, (str(self), self.param)


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                       prompt_param: str = "prompt", tokens_param: str = "max_tokens") -> int:
    """The completion budget: `max_tokens`, or (None) whatever the context leaves, as vLLM
    does. A prompt that leaves no room names the prompt; a budget that overflows names
    the budget's field."""
    if num_prompt_tokens >= max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {num_prompt_tokens} tokens, leaving no room for the completion. "
            f"Please shorten the {prompt_param}.", prompt_param)
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if max_tokens >= 1 and num_prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"{prompt_param}, {max_tokens} for the completion). Please reduce the length of "
            f"the {prompt_param} or {tokens_param}.", tokens_param)
    return max_tokens


def _config_eos_ids(hf_config: dict) -> frozenset[int]:
    eos = hf_config.get("eos_token_id")
    return frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])


class InputProcessor:
    def __init__(self, config: EngineConfig) -> None:
        model_dir = config.model.model
        hf_config = read_hf_config(model_dir)
        self.config = config.with_max_model_len(_resolve_max_model_len(config, hf_config))
        self.vocab_size = int(hf_config["vocab_size"])
        # A directory with only config.json + weights (benchmark shapes) runs on token ids.
        tok_dir = config.model.tokenizer or model_dir
        self.tokenizer = (Tokenizer(tok_dir, config.model.chat_template)
                          if os.path.exists(os.path.join(tok_dir, "tokenizer.json")) else None)
        if config.model.trust_remote_code:
            logger.warning("trust_remote_code has no effect: tandem runs its built-in "
                           "architectures and never a checkpoint's own code")
        self.eos_token_ids = (self.tokenizer.eos_token_ids if self.tokenizer is not None
                              else _config_eos_ids(hf_config))
        # Defaults for what a request leaves unset (the model's generation_config.json).
        self.sampling_defaults = sampling_defaults(model_dir, config.model.generation_config)

    @property
    def max_model_len(self) -> int:
        return self.config.model.max_model_len

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config defaults (as vLLM's LLM)."""
        return SamplingParams(**self.sampling_defaults)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt given as text, token ids or {"prompt_token_ids": ...}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            return prompt, self.encode_text(prompt)
        if isinstance(prompt, (list, tuple)) and _all_ints(prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got "
                         f"{type(prompt).__name__}")

    def encode_text(self, text: str, param: str = "prompt",
                    add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt. Text that cannot fit max_model_len (by a cheap lower
        bound on its token count) raises ContextLengthError before it is tokenized."""
        if self.tokenizer is None:
            raise ValueError(f"{param}: this model has no tokenizer.json; pass token ids")
        at_least = self.tokenizer.min_num_tokens(text)
        if at_least >= self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, your {param} is at least {at_least} tokens long. Please shorten "
                f"the {param}.", param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each word's tokens as written (leading spaces dropped) and, where a space in
        front makes other tokens of the same count (" word" as one token), those too."""
        if self.tokenizer is None:
            raise ValueError("bad_words need the model's tokenizer (tokenizer.json)")
        seqs: list[list[int]] = []
        for word in words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            for ids in (plain, spaced):
                if ids and ids not in seqs and (ids is plain or (
                        len(ids) == len(plain) and ids[0] != plain[0])):
                    seqs.append(ids)
        return seqs

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        """Everything about a request that could make a step fail, checked against this
        model before it is queued; ValueError names the field."""
        if not token_ids:
            raise ValueError("prompt is empty")
        vocab = self.vocab_size
        plain = set(map(type, token_ids)) == {int}  # then min/max decide (C loops, an 8k
        if not plain or min(token_ids) < 0 or max(token_ids) >= vocab:  # prompt: ~0.3 ms)
            bad = [t for t in token_ids if isinstance(t, bool) or not 0 <= t < vocab]
        else:
            bad = []
        if bad:
            raise ValueError(f"prompt_token_ids out of the vocabulary [0, {vocab}): {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens, but max_model_len is "
                             f"{self.max_model_len} (leaving no room to generate)")
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"stop_token_ids out of the vocabulary [0, {vocab}): {bad[:5]}")
        bad = [t for t in params.allowed_token_ids or [] if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"allowed_token_ids out of the vocabulary [0, {vocab}): "
                             f"{bad[:5]}")
        bad = [t for t in params.logit_bias if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias token ids out of the vocabulary [0, {vocab}): "
                             f"{bad[:5]}")
        if params.bad_words and params.bad_words_token_ids is None:
            params.set_bad_words_token_ids(self._bad_words_token_ids(params.bad_words))
        cap = self.config.model.max_logprobs
        limit = vocab if cap == -1 else min(cap, vocab)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > limit:
                raise ValueError(f"{name} must be at most {limit} (max_logprobs), got {value}")


def _resolve_max_model_len(config: EngineConfig, hf_config: dict) -> int:
    derived = int(hf_config.get("max_position_embeddings") or 2048)
    asked = config.model.max_model_len
    if asked is not None and asked > derived:
        raise ValueError(f"max_model_len={asked} exceeds the model's "
                         f"max_position_embeddings={derived}")
    return asked or derived


def _all_ints(ids: list | tuple) -> bool:
    """Whether every id is an int (bool included: `validate` names those), in C loops when
    all are plain ints (an 8k-token prompt's TTFT pays this)."""
    return set(map(type, ids)) == {int} or all(isinstance(t, int) for t in ids)
