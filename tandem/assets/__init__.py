"""The models shipped inside the package (Hugging Face-format directories), so tandem runs
with no download: a small Python code-completion model and its draft for speculative
decoding. `scripts/train_default_model.py` trains both; each directory has a model card."""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def _model_dir(name: str) -> str:
    path = os.path.join(_HERE, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the embedded model {name!r} is missing from {path}")
    return path


def default_model_dir() -> str:
    """The embedded default model: a ~22M-parameter Python code-completion Llama."""
    return _model_dir("default_model")


def default_draft_model_dir() -> str:
    """The embedded draft model (same tokenizer) for speculative decoding."""
    return _model_dir("draft_model")
