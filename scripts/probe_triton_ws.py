"""Does Triton's Hopper warp specialization (`tl.range(..., warp_specialize=True)`) run an
attention loop here? A minimal non-causal FlashAttention forward (one 8k prompt, 32/8 heads
of 128, bf16, Q/K/V through tensor descriptors), each variant in its own process with a
time limit, since a specialized kernel that deadlocks never returns. Prints, per variant:
finished or hung, ms, and the largest difference from torch's SDPA.

    python scripts/probe_triton_ws.py [--timeout 40]

(Twenty-third session: the engine's causal variant compiled to producer and consumer
warp groups at num_warps=4 but hung on an H200; docs/decode.md.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANTS = ["plain", "ws"]


def child(variant: str) -> None:
    import torch
    import triton
    import triton.language as tl
    from triton.testing import do_bench
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def attn(q_desc, k_desc, v_desc, o_ptr, scale_log2, n_ctx, HEADS: tl.constexpr,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             GROUP: tl.constexpr, WS: tl.constexpr):
        m0 = tl.program_id(0) * BLOCK_M
        h = tl.program_id(1)
        kvh = h // GROUP
        q = q_desc.load([m0, h * HEAD_DIM])
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for n0 in tl.range(0, n_ctx, BLOCK_N, warp_specialize=WS):
            k = k_desc.load([n0, kvh * HEAD_DIM])
            s = tl.dot(q, tl.trans(k))
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
            p = tl.exp2(s * scale_log2 - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = v_desc.load([n0, kvh * HEAD_DIM])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        rows = m0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        tl.store(o_ptr + rows[:, None] * (HEADS * HEAD_DIM) + h * HEAD_DIM + d[None, :],
                 (acc / l_i[:, None]).to(tl.bfloat16))

    t, heads, kv_heads, d = 8192, 32, 8, 128
    q, k, v = (torch.randn(t, n * d, device="cuda", dtype=torch.bfloat16)
               for n in (heads, kv_heads, kv_heads))
    out = torch.empty_like(q)
    descs = [TensorDescriptor(x, list(x.shape), [x.stride(0), 1], [128, d]) for x in (q, k, v)]

    def run():
        attn[(t // 128, heads)](*descs, out, d ** -0.5 * 1.4426950408889634, t, HEADS=heads,
                                HEAD_DIM=d, BLOCK_M=128, BLOCK_N=128, GROUP=heads // kv_heads,
                                WS=variant == "ws", num_warps=4 if variant == "ws" else 8,
                                num_stages=2)
    run()
    torch.cuda.synchronize()
    ms = do_bench(run, warmup=5, rep=50)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.view(t, heads, d).transpose(0, 1), k.view(t, kv_heads, d).transpose(0, 1),
        v.view(t, kv_heads, d).transpose(0, 1), enable_gqa=True).transpose(0, 1)
    err = (out.view(t, heads, d).float() - ref.float()).abs().max().item()
    print(json.dumps({"variant": variant, "ms": ms, "TFLOPs": 4 * t * t * heads * d / ms / 1e9,
                      "max_abs_err": err}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--timeout", type=float, default=40.0)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    rows = []
    for variant in VARIANTS:
        try:
            res = subprocess.run([sys.executable, __file__, "--child", variant],
                                 capture_output=True, text=True, timeout=args.timeout)
            line = [x for x in res.stdout.splitlines() if x.startswith("{")]
            row = json.loads(line[-1]) if line else {"variant": variant, "error":
                                                      res.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:
            row = {"variant": variant, "hung_s": args.timeout}
        rows.append(row)
        print(row, flush=True)
    print(json.dumps({"benchmark": "probe_triton_ws", "rows": rows}))


if __name__ == "__main__":
    main()
