"""msgpack encoding of the executor's messages: plans, results and worker control.

Plans go to every worker each step, so they travel as msgpack, not pickle: compact, fast,
and no code runs on decode. Each registered dataclass becomes an extension object (a type
code and the list of its field values, in declaration order); enums travel as their value.
Registering a class is the one place its wire format is defined.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import msgpack

from tandem.outputs import NewRequestData, ScheduledSeq, StepPlan, StepResult
from tandem.request import RequestOutputKind, SamplingParams

_BY_TYPE: dict[type, int] = {}
_BY_CODE: dict[int, tuple[type, list[str]]] = {}


def register(cls: type) -> type:
    """Give a dataclass a wire format (usable as a decorator)."""
    code = len(_BY_CODE) + 1
    _BY_TYPE[cls] = code
    _BY_CODE[code] = (cls, [f.name for f in dataclasses.fields(cls)])
    return cls


for _cls in (SamplingParams, NewRequestData, ScheduledSeq, StepPlan, StepResult):
    register(_cls)
_ENUMS = {"output_kind": RequestOutputKind}  # enum-valued fields, rebuilt on decode


def _default(obj: Any) -> Any:
    code = _BY_TYPE.get(type(obj))
    if code is None:
        if isinstance(obj, enum.Enum):
            return obj.value
        raise TypeError(f"cannot encode {type(obj).__name__} (register it in executor/codec.py)")
    values = [getattr(obj, name) for name in _BY_CODE[code][1]]
    return msgpack.ExtType(code, msgpack.packb(values, default=_default, use_bin_type=True))


def _ext_hook(code: int, data: bytes) -> Any:
    cls, names = _BY_CODE[code]
    values = msgpack.unpackb(data, ext_hook=_ext_hook, strict_map_key=False, raw=False)
    kwargs = dict(zip(names, values))
    for name, kind in _ENUMS.items():
        if name in kwargs:
            kwargs[name] = kind(kwargs[name])
    return cls(**kwargs)


def encode(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, strict_map_key=False, raw=False)
