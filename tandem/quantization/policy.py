"""`QuantPolicy`: the quantization method of every linear layer, by module path.

    quantization="fp8" | "int8" | "int4" | "int4_asym"   every decoder-layer linear
    quantization="policy.json"                              per-layer choices:

    {"default": "int4",                       # decoder-layer linears not matched below
     "layers": {"model.layers.0.*": "int8",   # fnmatch patterns on the module path,
                "*.self_attn.o_proj": "none", # first match wins ("none": unquantized)
                "lm_head": "int8"}}           # the LM head only when named

The embedding is never quantized (it is a lookup, not a matmul).
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass

METHODS = ("fp8", "int8", "int4", "int4_asym")  # methods.py registers each
NONE = "none"


@dataclass(frozen=True, slots=True)
class QuantPolicy:
    default: str  # method of decoder-layer linears no rule matches ("none": unquantized)
    rules: tuple[tuple[str, str], ...] = ()  # (fnmatch pattern on the module path, method)
    source: str = ""  # what the user passed, for logs

    def __post_init__(self) -> None:
        for method in (self.default, *(m for _, m in self.rules)):
            if method not in METHODS + (NONE,):
                raise ValueError(f"quantization method {method!r} is not one of "
                                 f"{METHODS + (NONE,)}")

    def method_for(self, prefix: str) -> str | None:
        """The method name for the layer at `prefix`, or None (unquantized)."""
        for pattern, method in self.rules:
            if fnmatch.fnmatchcase(prefix, pattern):
                return None if method == NONE else method
        if prefix.startswith("model.layers."):
            return None if self.default == NONE else self.default
        return None

    @staticmethod
    def parse(value: str | None) -> QuantPolicy | None:
        """`quantization` as given: a method name, a policy JSON path, or None."""
        if value is None or value == NONE:
            return None
        if value in METHODS:
            return QuantPolicy(value, source=value)
        if not os.path.isfile(value):
            raise ValueError(f"quantization must be one of {METHODS} or a policy JSON file, "
                             f"got {value!r}")
        with open(value) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"quantization policy {value!r} is not JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("layers", {}), dict):
            raise ValueError(f"quantization policy {value!r}: expected an object with "
                             f"'default' and 'layers'")
        return QuantPolicy(data.get("default", NONE), tuple(data.get("layers", {}).items()),
                           source=value)

    def to_json(self) -> dict:
        return {"default": self.default, "layers": dict(self.rules)}
