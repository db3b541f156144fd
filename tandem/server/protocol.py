"""The OpenAI wire format as pydantic models: requests in, responses and stream chunks out.

Requests are parsed strictly, as OpenAI does: `"max_tokens": "5"`, `"stream": "yes"` or a
boolean among token ids are 400s, not coerced. Explicit nulls are accepted for optional
fields (some clients send them). Every string anywhere in a request is checked for lone
UTF-16 surrogates (JSON can carry them; no tokenizer can encode them). Fields this server
does not implement are refused with a 400 naming them unless their value asks for nothing
(`UNSUPPORTED`); any other unknown field is ignored and logged, as vLLM does.
`to_sampling_params` maps a request onto `SamplingParams`, whose own checks name the field.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from tandem.request import RequestOutputKind, SamplingParams

MAX_N = 128  # most choices per prompt (OpenAI's limit); each one is a sequence in the engine
MAX_STOP = 64  # most stop strings per request
MAX_STOP_TOKEN_IDS = 1024  # most stop token ids per request
MAX_LOGIT_BIAS = 1024  # entries: bounded work per request (OpenAI allows 300)
# torch.Generator takes 64-bit seeds; sample i of n uses seed + i, so stay in the signed range.
SEED_RANGE = (-2**63, 2**63 - 1)


def _none(v: Any) -> bool:
    return v is None


def _empty(v: Any) -> bool:
    return not v


# Known fields this server does not implement -> whether a value asks for nothing (then it
# is accepted as the no-op it is); any other value is a 400 that names the field.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "tools": _empty, "functions": _empty,  # tools: a chat field (tool_choice "none")
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "parallel_tool_calls": lambda v: v in (None, True, False),  # no tools, no effect
    "guided_json": _none, "guided_regex": _none, "guided_choice": _none,
    "guided_grammar": _none, "guided_decoding_backend": _none,
    "guided_whitespace_pattern": _none, "structured_outputs": _none,
    "use_beam_search": _empty, "length_penalty": lambda v: v in (None, 1, 1.0),
    "logits_processors": _empty,
    "priority": lambda v: v in (None, 0),
    "spaces_between_special_tokens": lambda v: v in (None, True),
    "prompt_embeds": _none, "mm_processor_kwargs": _none, "cache_salt": _none,
    "kv_transfer_params": _none, "vllm_xargs": _none, "documents": _none,
    "continue_final_message": _empty, "audio": _none, "prediction": _none,
    "reasoning_effort": _none, "web_search_options": _none, "store": _empty,
    "modalities": lambda v: v in (None, ["text"]),
    "service_tier": lambda v: v in (None, "auto", "default"),
}


def _surrogate_path(value: Any, path: str) -> str | None:
    """The path of the first string under `value` holding a lone UTF-16 surrogate."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and _surrogate_path(key, path):
            return path or "body"
        found = _surrogate_path(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


class RequestModel(BaseModel):
    """A request body: strict types, no lone surrogates, unsupported fields refused."""

    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        where = _surrogate_path(data, "")
        if where is not None:
            raise PydanticCustomError("lone_surrogate", "text holds a lone UTF-16 surrogate "
                                      "(not valid Unicode)", {"field": where})
        return data

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> RequestModel:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and not UNSUPPORTED[name](value):
                raise PydanticCustomError("unsupported", "{field} is not supported by this "
                                          "server", {"field": name})
        return self

    def ignored_fields(self) -> list[str]:
        """Unknown fields (not in UNSUPPORTED either): ignored, and logged by the caller."""
        return [k for k in (self.model_extra or {}) if k not in UNSUPPORTED]


class StreamOptions(RequestModel):
    include_usage: bool | None = False
    # vLLM's: with include_usage, every chunk carries its choice's usage so far too
    continuous_usage_stats: bool | None = False


class SamplingRequest(RequestModel):
    """Fields both generation endpoints share: OpenAI's, then vLLM's extensions."""

    model: str | None = None
    n: int | None = Field(1, le=MAX_N)
    temperature: float | None = None  # None: the model's default (generation_config) or 1.0
    top_p: float | None = None
    # Matched against the text after every token: bounded, so one request cannot slow the
    # engine thread for everyone (OpenAI allows 4).
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the end user, for the request log
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    # OpenAI's: token id (as a string, JSON's keys) -> bias in [-100, 100]
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    # vLLM's: sample only among these ids
    allowed_token_ids: Annotated[list[int], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    return_tokens_as_token_ids: bool | None = False  # logprob tokens as "token_id:N"
    # vLLM's: each choice's generated token ids and its prompt's (streamed: each chunk's
    # new ids, the prompt's with a choice's first chunk)
    return_token_ids: bool | None = False
    bad_words: list[str] | None = Field(None, max_length=MAX_STOP)  # vLLM's

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:  # vLLM's 400 too
            raise PydanticCustomError("stream_options", "{field} is only allowed with "
                                      "stream: true", {"field": "stream_options"})
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def to_sampling_params(self, max_tokens: int, defaults: dict[str, Any],
                           logprobs: int | None = None,
                           prompt_logprobs: int | None = None) -> SamplingParams:
        """`defaults` (the model's generation_config) fill what the request leaves unset."""
        opt = {k: v for k, v in {
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "presence_penalty": self.presence_penalty, "top_k": self.top_k,
            "frequency_penalty": self.frequency_penalty, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "min_tokens": self.min_tokens,
        }.items() if v is not None}
        opt = {**{k: v for k, v in defaults.items() if k != "max_tokens"}, **opt}
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            bias[int(key)] = value
        return SamplingParams(
            logit_bias=bias, allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words or None,
            output_kind=RequestOutputKind.DELTA,  # the server streams what is new
            n=1 if self.n is None else self.n, stop=self.stop, max_tokens=max_tokens,
            stop_token_ids=self.stop_token_ids, ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens is not False,
            include_stop_str_in_output=bool(self.include_stop_str_in_output), **opt)


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    suffix: str | None = None
    # None: up to the context length (vLLM's behaviour; OpenAI's default is 16, which is
    # what an absent field means). 0 with echo scores the prompt without generating.
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    prompt_logprobs: int | None = None  # vLLM: top-N logprobs per prompt token
    add_special_tokens: bool | None = True  # vLLM: e.g. a BOS token, where the model adds one
    truncate_prompt_tokens: int | None = Field(None, ge=1)  # vLLM: keep the last N tokens


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, ... reach the template
    role: str
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _content_where_required(self) -> ChatMessage:
        """OpenAI's rule: only an assistant message may leave content out."""
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role!r} message needs content")
        return self

    def to_template(self) -> dict[str, Any]:
        """The message as a chat template sees it: content parts joined into text."""
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise ValueError("messages: only text content parts are supported")
            msg["content"] = "".join(p.text or "" for p in self.content)
        return msg


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the context length
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # vLLM extensions
    add_generation_prompt: bool | None = True
    add_special_tokens: bool | None = False  # the template already holds them
    chat_template: str | None = None  # a jinja template for this request
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables
    prompt_logprobs: None = None  # on /v1/completions only
    # Tools reach the chat template (its `tools`) only with tool_choice "none", as vLLM
    # renders them: no tool call is parsed out of the output, so nothing else is accepted.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # vLLM's: each choice's text starts with the last message's content when that message
    # is the assistant's (continuing it, with add_generation_prompt false)
    echo: bool | None = False

    @property
    def echoed(self) -> str:
        """The text echo puts in front of every choice ("" when nothing is echoed)."""
        last = self.messages[-1]
        if not self.echo or last.role != "assistant" or last.content is None:
            return ""
        return last.to_template()["content"]

    @model_validator(mode="after")
    def _tools_for_the_template_only(self) -> ChatCompletionRequest:
        if self.tools and self.tool_choice != "none":  # unset means "auto" with tools
            raise PydanticCustomError(
                "unsupported", "{field}: tool calling is not supported by this server; "
                "send tools with tool_choice \"none\" (the chat template sees them, no "
                "call is parsed)",
                {"field": "tools" if self.tool_choice is None else "tool_choice"})
        if self.tool_choice not in (None, "none", "auto"):
            raise PydanticCustomError("unsupported", "{field} is not supported by this server",
                                      {"field": "tool_choice"})
        return self


class TokenizeRequest(RequestModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True
    return_token_strs: bool | None = False  # vLLM's: each token's string as well


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


# ---- responses -----------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id that matched
    prompt_logprobs: list[dict[str, dict] | None] | None = None  # vLLM's, when asked
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id that matched
    token_ids: list[int] | None = None  # vLLM's return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids


class ChatStreamChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role": "assistant"} first, then {"content": ...}; {} at the end
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's return_token_ids


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tandem"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
