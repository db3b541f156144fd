"""Architecture name (config.json "architectures"[0]) -> model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from tandem.models.llama import (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
                                 Qwen3ForCausalLM)
from tandem.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class_for(hf_config: dict[str, Any]) -> type[nn.Module]:
    """The class for the config's first listed architecture; ValueError if unsupported."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    shown = ", ".join(archs) if archs else "(none listed in config.json)"
    raise ValueError(f"unsupported architecture {shown}; supported: {', '.join(ARCHITECTURES)}")
