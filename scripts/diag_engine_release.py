"""Does `del llm` give an engine's device memory back? (a diagnostic, CUDA or CPU)

    python scripts/diag_engine_release.py [--device cuda] [--arch LlamaForCausalLM ...]

For each case (architecture x async scheduling) it builds a tiny random model, runs an
`LLM` on it, drops the last reference with the garbage collector off, and reports whether
the engine died by reference counting alone and how much device memory torch still has
allocated. If the engine outlived `del`, a collection with `gc.DEBUG_SAVEALL` lists the
types in the reference cycles that held it, so the cycle can be found and broken.
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
import tempfile
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tandem import LLM, SamplingParams  # noqa: E402
from tests.model_factory import make_tiny_model  # noqa: E402


def allocated(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else 0.0


def case(arch: str, device: str, async_scheduling: bool, tmp: str) -> None:
    path = make_tiny_model(Path(tmp) / arch, arch)
    before = allocated(device)
    gc.disable()
    llm = LLM(path, device=device, load_format="dummy", max_model_len=256,
              num_kv_blocks=4096, async_scheduling=async_scheduling)
    llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=16, ignore_eos=True),
                 use_tqdm=False)
    engine = weakref.ref(llm.engine)
    held = allocated(device)
    del llm
    alive = engine() is not None
    after_del = allocated(device)
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    gc.set_debug(0)
    kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}"
                                for o in gc.garbage)
    gc.garbage.clear()
    gc.collect()
    gc.enable()
    after_gc = allocated(device)
    print(f"{arch:<22} async={async_scheduling!s:<5} held {held - before:8.1f} MiB; "
          f"after del: engine {'ALIVE' if alive else 'freed'}, {after_del - before:8.1f} MiB; "
          f"after gc: {after_gc - before:8.1f} MiB", flush=True)
    if alive:
        ours = [(k, n) for k, n in kinds.most_common() if k.startswith("tandem")]
        print("   tandem objects in the cycles:", ours[:25])
        print("   most common:", kinds.most_common(12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", nargs="+", default=["LlamaForCausalLM", "Qwen3MoeForCausalLM"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            for async_scheduling in (False, True):
                case(arch, args.device, async_scheduling, tmp)


if __name__ == "__main__":
    main()
