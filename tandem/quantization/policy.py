"""`QuantPolicy`: the quantization method of every linear layer, by module path.

    quantization="fp8" | "int8" | "int4" | "int4_asym"   every decoder-layer linear
    (also "fp8_weight_only", and int4 with another group size: "int4_g64", "int4_asym_g256")
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
import re
from dataclasses import dataclass

METHODS = ("fp8", "int8", "int4", "int4_asym")  # the main ones; methods.py makes each
NONE = "none"
_METHOD = re.compile(r"fp8|fp8_weight_only|int8|int4(_asym)?(_g(32|64|128|256))?"
                     r"|ct_fp8_channel|ct_int4(_asym)?_(g\d+|ch)")  # ct_: compressed-tensors
# tandem fuses these checkpoint layers; a rule naming one of the parts names the whole
_FUSED = {".qkv_proj": ".q_proj", ".gate_up_proj": ".gate_proj"}


def is_method(name: str) -> bool:
    """Whether `name` is a method (METHODS, fp8_weight_only, int4[_asym]_gN)."""
    return isinstance(name, str) and _METHOD.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class QuantPolicy:
    default: str  # method of decoder-layer linears no rule matches ("none": unquantized)
    rules: tuple[tuple[str, str], ...] = ()  # (fnmatch pattern on the module path, method)
    source: str = ""  # what the user passed, for logs

    def __post_init__(self) -> None:
        for method in (self.default, *(m for _, m in self.rules)):
            if method != NONE and not is_method(method):
                raise ValueError(f"quantization method {method!r} is not one of "
                                 f"{METHODS + (NONE,)} (or fp8_weight_only, int4[_asym]_gN)")

    def method_for(self, prefix: str) -> str | None:
        """The method name for the layer at `prefix`, or None (unquantized). A pattern is
        fnmatch-style, or "re:REGEX" (compressed-tensors' spelling, re.match)."""
        names = [prefix] + [prefix.replace(f, part) for f, part in _FUSED.items() if f in prefix]
        for pattern, method in self.rules:
            if any(_matches(pattern, name) for name in names):
                return None if method == NONE else method
        if prefix.startswith("model.layers."):
            return None if self.default == NONE else self.default
        return None

    @staticmethod
    def parse(value: str | None) -> QuantPolicy | None:
        """`quantization` as given: a method name, a policy JSON path, or None."""
        if value is None or value == NONE:
            return None
        if is_method(value):
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


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)

