"""The model's tokenizer (`tokenizers` library), its special tokens and its chat template.

Reads `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template) or the newer
`chat_template.jinja`, and `generation_config.json` (EOS ids). No `transformers` at run time.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_str(tok: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


# What the renderer sets itself: chat_template_kwargs may not override these.
TEMPLATE_RESERVED = frozenset({"messages", "add_generation_prompt", "chat_template",
                               "bos_token", "eos_token"})


class Tokenizer:
    def __init__(self, model_dir: str, chat_template: str | None = None) -> None:
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise ValueError(f"no tokenizer.json in {model_dir}")
        self._tok = HFTokenizer.from_file(path)
        cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        gen = _read_json(os.path.join(model_dir, "generation_config.json"))
        model_cfg = _read_json(os.path.join(model_dir, "config.json"))
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids = self._eos_ids(gen, model_cfg)
        self.bos_token_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self.chat_template = self._load_template(model_dir, cfg, chat_template)
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items()
                                     if t.special)
        # Most UTF-8 bytes of text one token can cover: the longest vocabulary entry, in
        # its stored form (byte-level BPE stores a byte as a character of up to 2 bytes, so
        # this over-counts, which keeps `min_num_tokens` a true lower bound). A normalizer
        # could shrink text before it is split, so allow for a factor of 4 there.
        vocab = self._tok.get_vocab(with_added_tokens=True)
        longest = max((len(t.encode("utf-8", "replace")) for t in vocab), default=1)
        self.max_bytes_per_token = longest * (4 if self._tok.normalizer is not None else 1)

    def _eos_ids(self, gen: dict, model_cfg: dict) -> frozenset[int]:
        ids = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
        out = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.eos_token and self.token_to_id(self.eos_token) is not None:
            out.add(self.token_to_id(self.eos_token))
        return frozenset(out)

    @staticmethod
    def _load_template(model_dir: str, cfg: dict, override: str | None) -> str | None:
        if override is not None:  # a path or the template text itself
            if os.path.exists(override):
                with open(override, encoding="utf-8") as f:
                    return f.read()
            return override
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        if os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                return f.read()
        tmpl = cfg.get("chat_template")
        if isinstance(tmpl, list):  # named templates: take the default one
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
        return tmpl

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def min_num_tokens(self, text: str) -> int:
        """A cheap lower bound on len(encode(text)): rejects a prompt that cannot fit
        without tokenizing all of it (a 10 MB string takes seconds to encode)."""
        if len(text) * 4 < self.max_bytes_per_token:  # short text: not worth counting bytes
            return 0
        num_bytes = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        return num_bytes // self.max_bytes_per_token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True,
                            chat_template: str | None = None,
                            template_kwargs: dict[str, Any] | None = None,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render `messages` with `chat_template` (text) or else the model's own template;
        template_kwargs: extra template variables (none of TEMPLATE_RESERVED); tools: the
        template's `tools` (OpenAI's tool definitions, rendered as the template does)."""
        kwargs = dict(template_kwargs or {})
        reserved = TEMPLATE_RESERVED & set(kwargs)
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {sorted(reserved)}")
        if tools:
            kwargs["tools"] = tools
        template_text = chat_template if chat_template is not None else self.chat_template
        if not template_text:
            raise ValueError("this model has no chat template; pass chat_template= "
                             "(or --chat-template) to use chat")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(msg: str) -> None:
            raise ValueError(f"chat template error: {msg}")

        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        try:
            template = env.from_string(template_text)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                   **kwargs)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed to render: {e}") from e
