"""The K/V write of a prompt's tokens (`kv_write.rotary_write_kv`, the Llama path, and
`write_kv`) into a bf16 cache and an FP8 one, whose blocks hold V transposed (each token's
V bytes land 16 apart). Llama-3.1-8B heads (32/8 of 128), 8192 tokens of two prompts in
shuffled blocks. Prints a table and one JSON line.

    python scripts/bench_kv_write.py [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "kernels"))
from attention_bench import emit, make_case, time_launch  # noqa: E402

from tandem.kernels.reference import attention as reference_attention  # noqa: E402
from tandem.kernels.triton import write_kv  # noqa: E402
from tandem.kernels.triton.kv_write import rotary_write_kv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    cache, query, key, value, metas = make_case([4096, 4096], [4096, 4096], seed=1)
    slots = metas[0].slot_mapping
    t, d = key.shape[0], key.shape[2]
    pos = torch.arange(t, device=key.device) % 4096
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=key.device).float() / d))
    ang = torch.arange(8192, device=key.device).float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, 1), torch.cat([ang.sin()] * 2, 1)
    rows = []
    for label, kv in (("bf16", cache), ("fp8", reference_attention.quantize_cache(
            cache, (1.0, 1.0)))):
        for op, fn in (("rotary_write_kv", lambda kv=kv: rotary_write_kv(
                            pos, query, key, value, cos, sin, kv, slots, (1.0, 1.0))),
                       ("write_kv", lambda kv=kv: write_kv(key, value, kv, slots))):
            fn()
            ms = time_launch(fn)
            moved = t * key.shape[1] * d * 2 * (kv.element_size() + key.element_size())
            rows.append({"cache": label, "op": op, "tokens": t, "us": ms * 1e3,
                         "GBps": moved / ms / 1e6})
            print(f"{label:<5} {op:<16} {ms * 1e3:8.1f} us  {moved / ms / 1e6:6.0f} GB/s "
                  "(K/V read + written)", flush=True)
    emit(rows, args.json)


if __name__ == "__main__":
    main()
