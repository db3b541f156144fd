"""Keep the garbage collector's full passes off the serving path.

A full (oldest-generation) pass walks every object the collector tracks. An engine's
process holds hundreds of thousands of them before it serves anything (its imports, the
model's modules, the engine), and a pass mid-run stops the host with the device idle:
H200, Llama-3.1-8B shapes, 1024 x 512/256 offline, six gaps of 214-264 ms with no device
work, 1.6 s of a 25.7 s run (bench/results/2026-12-02-h200-fp8-qk-443d922/). While an
engine loop runs, `frozen_heap` keeps the objects alive when it started out of every pass
(`gc.freeze`); when the last running loop ends they are unfrozen, so whatever of them died
meanwhile in a reference cycle is collected as usual: nothing leaks.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0  # loops running in this process (an offline LLM, a server's engine thread)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    global _depth
    with _lock:
        if _depth == 0:
            gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.unfreeze()
