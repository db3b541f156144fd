"""A probe: fresh-prompt prefill attention with Q/K/V tiles fetched by the Hopper tensor
memory accelerator (Triton tensor descriptors) against kernels/triton/prefill.py's pointer
loads, same tiling and online softmax. Llama-3.1-8B heads (32/8 of 128), bf16, K/V read
straight from this step's rows (the FRESH path a prompt with no cached prefix takes).

    python scripts/bench_prefill_tma.py [--json F]

Cases: one 8192-token prompt (the 8k prefill benchmark), two 4096-token prompts. Prints a
table (ms, TFLOP/s of causal work, max error against the production kernel) and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "kernels"))
from attention_bench import SCALE, causal_flops, make_case, time_launch  # noqa: E402

from tandem.kernels.triton import prefill_attention  # noqa: E402


@triton.jit
def _tma_kernel(q_desc, k_desc, v_desc, out_ptr, query_start_loc_ptr, scale_log2,
                stride_ot, stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_STAGES: tl.constexpr,
                WARP_SPEC: tl.constexpr):
    h = tl.program_id(0)
    tile = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    num_tiles = tl.cdiv(q_len, BLOCK_M)
    if tile >= num_tiles:
        return
    m0 = (num_tiles - 1 - tile) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    kvh = h // GROUP
    q = q_desc.load([q_start + m0, h * HEAD_DIM])  # rows past the prompt: not stored
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = ((m0 + 1) // BLOCK_N) * BLOCK_N
    n_end = tl.minimum(q_len, m0 + BLOCK_M)
    for n0 in tl.range(0, n_full, BLOCK_N, num_stages=LOOP_STAGES,
                       warp_specialize=WARP_SPEC):
        k = k_desc.load([q_start + n0, kvh * HEAD_DIM])
        v = v_desc.load([q_start + n0, kvh * HEAD_DIM])
        s = tl.dot(q, k.T) * scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        pr = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new
    for n0 in range(n_full, n_end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        k = k_desc.load([q_start + n0, kvh * HEAD_DIM])
        v = v_desc.load([q_start + n0, kvh * HEAD_DIM])
        s = tl.dot(q, k.T) * scale_log2
        s = tl.where((offs[None, :] <= rows[:, None]) & (offs < q_len)[None, :], s,
                     float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        pr = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new
    o = acc / l_i[:, None]
    d = tl.arange(0, HEAD_DIM)
    dst = out_ptr + (q_start + rows).to(tl.int64)[:, None] * stride_ot + h * stride_oh
    tl.store(dst + d[None, :], o.to(out_ptr.dtype.element_ty), mask=(rows < q_len)[:, None])


def tma_prefill(query, key, value, out, query_start_loc, max_query_len, cfg):
    block_m, block_n, warps, stages, loop_stages, ws = cfg
    t, heads, d = query.shape
    kv_heads = key.shape[1]
    q_desc = TensorDescriptor(query, [t, heads * d], [query.stride(0), 1], [block_m, d])
    k_desc = TensorDescriptor(key, [t, kv_heads * d], [key.stride(0), 1], [block_n, d])
    v_desc = TensorDescriptor(value, [t, kv_heads * d], [value.stride(0), 1], [block_n, d])
    grid = (heads, triton.cdiv(max_query_len, block_m), query_start_loc.shape[0] - 1)
    _tma_kernel[grid](q_desc, k_desc, v_desc, out, query_start_loc,
                      SCALE * 1.4426950408889634, out.stride(0), out.stride(1),
                      GROUP=heads // kv_heads, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
                      LOOP_STAGES=loop_stages, WARP_SPEC=ws, num_warps=warps,
                      num_stages=stages)


CASES = [("1 x 8192", [8192]), ("2 x 4096", [4096, 4096])]
CONFIGS = [(128, 128, 8, 3, 3, False), (128, 64, 8, 3, 3, False), (128, 128, 8, 2, 2, False),
           (128, 128, 8, 4, 4, False), (128, 128, 4, 3, 3, False), (128, 128, 8, 3, 3, True),
           (128, 64, 8, 3, 3, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, lens in CASES:
        cache, query, key, value, metas = make_case(lens, lens, seed=len(lens))
        m = metas[0]
        flops = sum(causal_flops(n, n) for n in lens)
        ref = torch.empty_like(query)

        def prod(out=ref):
            prefill_attention(query, cache, out, m.query_start_loc, m.seq_lens,
                              m.block_tables, SCALE, max(lens), key=key, value=value)
        prod()
        ms = time_launch(prod)
        rows.append({"case": name, "kernel": "prefill.py", "ms": ms,
                     "TFLOPs": flops / ms / 1e9})
        print(f"{name:<10} prefill.py (default)          {ms:7.3f} ms "
              f"{flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
        for cfg in CONFIGS:
            out = torch.zeros_like(query)
            row = {"case": name, "kernel": "tma", "config": cfg}
            try:
                run = lambda: tma_prefill(query, key, value, out, m.query_start_loc,  # noqa
                                          max(lens), cfg)
                run()
                ms = time_launch(run)
                row |= {"ms": ms, "TFLOPs": flops / ms / 1e9,
                        "max_abs_err": (out.float() - ref.float()).abs().max().item()}
                print(f"{name:<10} tma {str(cfg):<28} {ms:7.3f} ms {row['TFLOPs']:6.0f} "
                      f"TFLOP/s  max err {row['max_abs_err']:.4f}", flush=True)
            except Exception as exc:  # a config Triton cannot build here
                row["error"] = repr(exc)[:300]
                print(f"{name:<10} tma {cfg}: {row['error']}", flush=True)
            rows.append(row)
    record = {"device": torch.cuda.get_device_name(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(record))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
