"""Sampling defaults from a model's `generation_config.json`, as vLLM applies them.

Only the fields a request can also set are read; a request's own value always wins. The
file's `max_new_tokens` becomes the default `max_tokens`.
"""

from __future__ import annotations

import json
import os
from typing import Any

# generation_config.json key -> SamplingParams field
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def sampling_defaults(model_dir: str, setting: str = "auto") -> dict[str, Any]:
    """The defaults `setting` selects: "auto" (the model's file), "vllm"/"none" (nothing),
    or a directory with a generation_config.json. ValueError when that directory has none."""
    if setting in ("vllm", "none"):
        return {}
    folder = model_dir if setting == "auto" else setting
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        if setting == "auto":
            return {}
        raise ValueError(f"generation_config: no generation_config.json in {setting!r}")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return {field: config[key] for key, field in _FIELDS.items() if config.get(key) is not None}
