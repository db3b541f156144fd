"""Fresh-prompt causal attention: the engine's Triton prefill kernel against PyTorch's SDPA
backends (cuDNN, flash, memory-efficient) on Llama-3.1-8B heads (32/8 of 128), bf16.

    python scripts/bench_prefill_sdpa.py [--json F] [--lens 8192,4096]

SDPA takes [B, H, S, D]; the engine holds [T, H, D] rows. Each backend is timed on
strided views of the engine's rows (no copy) and, where the views are refused, on
contiguous copies (the copy not timed). GQA goes through `enable_gqa` or, where that is
refused, K/V expanded to 32 heads. Prints ms, TFLOP/s of causal work and the largest
difference from the Triton kernel, then one JSON line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "kernels"))
from attention_bench import SCALE, causal_flops, emit, make_case, time_launch  # noqa: E402

from tandem.kernels.triton import prefill_attention  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--lens", default="8192,4096,2048,1024,512")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}", flush=True)
    rows = []
    for n in (int(x) for x in args.lens.split(",")):
        cache, query, key, value, metas = make_case([n], [n], seed=n)
        m, flops = metas[0], causal_flops(n, n)
        ref = torch.empty_like(query)

        def triton_run():
            prefill_attention(query, cache, ref, m.query_start_loc, m.seq_lens,
                              m.block_tables, SCALE, n, key=key, value=value)
        triton_run()
        ms = time_launch(triton_run)
        rows.append({"len": n, "impl": "triton", "ms": ms, "TFLOPs": flops / ms / 1e9})
        print(f"{n:>6} {'triton':<28} {ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
        views = [x.transpose(0, 1).unsqueeze(0) for x in (query, key, value)]  # [1, H, T, D]
        layouts = {"views": views, "contiguous": [v.contiguous() for v in views]}
        for name, backend in BACKENDS.items():
            for layout, (q, k, v) in layouts.items():
                for gqa in ("enable_gqa", "expanded"):
                    if gqa == "expanded":
                        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
                        gqa_kw = {}
                    else:
                        gqa_kw = {"enable_gqa": True}
                    label = f"{name}/{layout}/{gqa}"

                    def run(q=q, k=k, v=v, kw=gqa_kw, backend=backend):
                        with sdpa_kernel([backend]):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                  scale=SCALE, **kw)
                    try:
                        out = run()
                        ms = time_launch(run)
                    except Exception as exc:
                        print(f"{n:>6} {label:<28} failed: {str(exc).splitlines()[0][:90]}",
                              flush=True)
                        continue
                    err = (out[0].transpose(0, 1).float() - ref.float()).abs().max().item()
                    rows.append({"len": n, "impl": label, "ms": ms, "TFLOPs": flops / ms / 1e9,
                                 "max_abs_err": err, "out_stride": list(out.stride())})
                    print(f"{n:>6} {label:<28} {ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s"
                          f"  max diff {err:.4f}  out strides {tuple(out.stride())}", flush=True)
    emit(rows, args.json)


if __name__ == "__main__":
    main()
