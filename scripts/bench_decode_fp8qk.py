"""A prototype, not used by the engine: decode attention over an FP8 (e4m3) cache with
Q K^T on FP8 tensor cores, timed against kernels/triton/decode.py's FP8 path at batch 64-256
x 4096 (Llama-3.1-8B heads, 32/8 of 128, shuffled block tables, one partition a sequence;
the cases of bench/kernels/attention_bench.py).
Measured on an H200 (bench/results/2026-12-02-h200-eighteenth-fp8qk-807d804/): 22-27%
slower than the engine's kernel at batch 256, so the engine does not use it.

The engine's kernel converts every K and V byte to fp16 in registers and multiplies on
mma.sync (16 padded query rows: too few for wgmma). Here the operands are swapped so that
the keys are wgmma's M: S^T = K (BLOCK_N, D) @ q^T (D, 16), e4m3 x e4m3, with q rounded to
e4m3 a head at a time (amax / 448, as the FP8 prefill does: reference e4m3_rows); K is never
converted. P V stays fp16 on mma.sync, V converted as before. Each point is checked against
the reference on the rounded query before it is timed.

    python scripts/bench_decode_fp8qk.py [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "kernels"))
from attention_bench import make_case  # noqa: E402

from tandem.bench.timing import graph_us  # noqa: E402
from tandem.kernels import reference  # noqa: E402
from tandem.kernels.reference.attention import e4m3_rows  # noqa: E402
from tandem.kernels.triton.decode import decode_attention  # noqa: E402


@triton.jit
def _decode_fp8qk(q_ptr, k_ptr, v_ptr, out_ptr, seq_lens_ptr, bt_ptr, scale_log2, v_scale,
                  stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                  NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + i)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    ok = g < GROUP
    q = tl.load(q_ptr + i * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    qs = tl.maximum(tl.max(tl.abs(q), 1), 1e-12) / 448.0
    qq = (q * (1.0 / qs)[:, None]).to(tl.float8e4nv)  # (GROUP_PAD, D), a scale a head
    sc = qs * scale_log2
    m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    table = bt_ptr + i.to(tl.int64) * stride_bt
    tile = tl.arange(0, BLOCK_N)
    for n0 in range(0, seq_len, BLOCK_N):
        offs = n0 + tile
        valid = offs < seq_len
        blk = tl.load(table + offs // BLOCK_SIZE, mask=valid, other=0)
        slot = blk.to(tl.int64) * BLOCK_SIZE + offs % BLOCK_SIZE
        off = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kvh * HEAD_DIM + d[None, :]
        kb = tl.load((k_ptr + off).to(tl.pointer_type(tl.uint8)), mask=valid[:, None], other=0)
        st = tl.dot(kb.to(tl.float8e4nv, bitcast=True), tl.trans(qq))  # (BLOCK_N, GROUP_PAD)
        s = tl.where(valid[None, :], tl.trans(st) * sc[:, None], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load((v_ptr + off).to(tl.pointer_type(tl.uint8)), mask=valid[:, None], other=0)
        v = vb.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
    tl.store(out_ptr + i * stride_ot + heads[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=ok[:, None])


def decode_fp8qk(q, cache, meta, scale, kv_scale, config):
    block_n, warps, stages = config
    t, h, dd = q.shape
    kvh = cache.shape[3]
    out = torch.empty_like(q)
    _decode_fp8qk[(t, kvh)](
        q, cache[0], cache[1], out, meta.seq_lens, meta.block_tables,
        scale * 1.4426950408889634 * kv_scale[0], kv_scale[1], q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), meta.block_tables.stride(0), NUM_KV_HEADS=kvh,
        GROUP=h // kvh, GROUP_PAD=max(16, triton.next_power_of_2(h // kvh)), HEAD_DIM=dd,
        BLOCK_SIZE=meta.block_size, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out


def batch(num_seqs: int, ctx: int, seed: int):
    """One decode row a sequence over `ctx` cached tokens (attention_bench.make_case), the
    bf16 cache's values turned into e4m3 codes for a scale of 0.05."""
    cache, q, _, _, metas = make_case([1] * num_seqs, [ctx] * num_seqs, seed=seed)
    cache = (cache.float() / 0.05).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, cache, metas[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()
    scale, kv_scale = 128 ** -0.5, (0.05, 0.05)
    configs = [(128, 4, 2), (128, 4, 3), (128, 8, 2), (64, 4, 3), (64, 4, 4)]
    rows = []
    for seqs in (64, 128, 192, 256):
        q, cache, meta = batch(seqs, args.ctx, seed=seqs)
        kv_bytes = seqs * args.ctx * 8 * 128 * 2
        ref = reference.paged_attention(e4m3_rows(q).float(), cache, meta, scale,
                                        kv_scale=kv_scale).float()
        out = torch.empty_like(q)

        def engine(out=out, q=q, cache=cache, meta=meta):
            decode_attention(q, cache, out, meta.query_start_loc, meta.seq_lens,
                             meta.block_tables, scale, max_seq_len=meta.max_seq_len,
                             kv_scale=kv_scale)
        points = [("engine (fp16 operands)", engine, None)]
        for cfg in configs:
            points.append((f"fp8 q k^t {cfg}",
                           (lambda q=q, cache=cache, meta=meta, cfg=cfg:
                            decode_fp8qk(q, cache, meta, scale, kv_scale, cfg)), cfg))
        print(f"\nbatch {seqs} x {args.ctx}: {kv_bytes / 1e6:.0f} MB of FP8 K/V")
        for name, fn, cfg in points:
            try:
                got = fn()
                got = out if got is None else got
                err = (got.float() - ref).abs().max().item()
                us = graph_us(fn, calls=16, repeats=5, best=True)
            except Exception as e:  # out of resources
                print(f"  {name:<28} {type(e).__name__}: {str(e)[:80]}")
                continue
            rows.append({"batch": seqs, "ctx": args.ctx, "kernel": name, "config": cfg,
                         "us": us, "GBps": kv_bytes / us / 1e3, "max_err": err})
            print(f"  {name:<28} {us:8.1f} us {kv_bytes / us / 1e3:7.0f} GB/s  "
                  f"max err {err:.3g} (vs the reference on the e4m3 query)")
        del cache
        torch.cuda.empty_cache()
    rec = {"bench": "decode_fp8qk", "device": torch.cuda.get_device_name(), "rows": rows}
    print(json.dumps(rec))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f)


if __name__ == "__main__":
    main()
