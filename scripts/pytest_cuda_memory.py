"""A pytest plugin (diagnostic): after each test, the CUDA memory torch holds and the
engines still alive in the process.

    PYTHONPATH=$PWD:$PWD/scripts python -m pytest -s -p pytest_cuda_memory tests/gpu ...
"""

from __future__ import annotations

import gc

import torch


def pytest_runtest_teardown(item, nextitem):
    if not torch.cuda.is_available():
        return
    from tandem.engine.engine import Engine
    engines = [o for o in gc.get_objects() if isinstance(o, Engine)]
    holders = []
    for e in engines[:2]:
        holders += [type(r).__qualname__ for r in gc.get_referrers(e)
                    if r is not engines][:6]
    print(f"\n[cuda-memory] {item.nodeid}: allocated "
          f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB, reserved "
          f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB, engines alive {len(engines)} "
          f"{holders}", flush=True)
