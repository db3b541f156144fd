"""`LLM`: the offline API in the convention vLLM users know.

    llm = LLM(model=DIR, max_num_seqs=64)
    outs = llm.generate(["def fib(n):", [1, 2, 3]], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

from tqdm.auto import tqdm

from tandem.config import EngineConfig
from tandem.engine.engine import Engine, PromptType
from tandem.engine.gc_heap import frozen_heap
from tandem.outputs import RequestOutput
from tandem.request import RequestOutputKind, SamplingParams


def _is_token_ids(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(t, int) for t in x)


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        if model is None:
            from tandem.assets import default_model_dir
            model = default_model_dir()
        self.engine = Engine(EngineConfig.from_kwargs(model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling a request gets when it gives none: the model's generation_config
        values over the built-in defaults (vLLM's)."""
        return self.engine.inputs.default_sampling_params()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order.

        Every prompt is validated before any is queued, so a ValueError leaves the engine
        exactly as it was."""
        ids, tokenized, params = self._prepare(prompts, sampling_params)
        for rid, (text, token_ids), sp in zip(ids, tokenized, params):
            # Offline callers read only final outputs: skip building one every step.
            sp = dataclasses.replace(sp, output_kind=RequestOutputKind.FINAL_ONLY)
            self.engine.add_request(rid, {"prompt": text, "prompt_token_ids": token_ids}, sp)
        return self._run(ids, use_tqdm)

    def _prepare(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None
                 ) -> tuple[list[str], list[tuple[str | None, list[int]]],
                            list[SamplingParams]]:
        """(request ids, (text, token ids) per prompt, params per prompt), every prompt
        validated; nothing queued."""
        if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:  # the model's generation_config defaults, as vLLM
            sampling_params = self.engine.inputs.default_sampling_params()
        params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                  else [sampling_params] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params has {len(params)} entries for "
                             f"{len(prompts)} prompts")
        tokenized = [self.engine.inputs.tokenize_prompt(p) for p in prompts]
        for i, ((_, token_ids), sp) in enumerate(zip(tokenized, params)):
            keep = sp.truncate_prompt_tokens
            if keep is not None and len(token_ids) > keep:  # the front goes; no text for it
                tokenized[i] = (None, token_ids[-keep:])
        for (_, token_ids), sp in zip(tokenized, params):
            self.engine.inputs.validate(token_ids, sp)
        return [str(next(self._ids)) for _ in prompts], tokenized, params

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None,
             continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them);
        chat_template_kwargs: extra template variables (vLLM's); tools: the template's
        `tools` (OpenAI's tool definitions; no tool call is parsed from the output)."""
        if continue_final_message:
            raise ValueError("continue_final_message is not supported")
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer; this model directory has none")
        texts = [tok.apply_chat_template(c, add_generation_prompt, chat_template,
                                         chat_template_kwargs, tools) for c in convs]
        prompts = [{"prompt": t, "prompt_token_ids": tok.encode(t, add_special_tokens=False)}
                   for t in texts]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)

    def _step_engines(self) -> list[RequestOutput]:
        """One step of the engine(s) behind this LLM (disagg/local.py runs two)."""
        return self.engine.step()

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        try:
            with frozen_heap():  # no full GC pass over the model and imports mid-run
                while pending:
                    for out in self._step_engines():
                        if out.finished and out.request_id in pending:
                            pending.discard(out.request_id)
                            done[out.request_id] = out
                            bar.update(1)
        except BaseException:  # leave nothing of this batch behind in the engine
            for rid in pending:
                self._abort(rid)
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]
