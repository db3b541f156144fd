"""The hardware bound of a workload: the least time the machine needs to do its work.

    roofline_s = max(FLOPs / matmul rate, bytes / memory bandwidth)

Both rates are measured on the benchmark's own device after its run (a large matmul in the
model's dtype; a device-to-device copy counting bytes read and written): the best of
repeats timed back to back for a second of each op (`measure`), so neither a cold clock
nor a power-throttled one lowers the denominator and flatters the fraction.
FLOPs: 2 x parameters x tokens through every linear layer (the LM head only for rows that
produce logits), plus attention (QK^T and PV: 4 x heads x head_dim x context per token).
Bytes: every weight read once per decode step (the embedding only for the rows looked up;
quantized layers at their method's bits per weight, scales included),
with as few steps as the KV pool allows (the largest batch it holds), plus every K/V byte
written once and read once per attention over it.

Mixture of experts: FLOPs count the active parameters only (per token and sparse layer: the
router, top_k experts, and a shared expert if any); a decode step of B tokens reads, per
sparse layer, the experts that B tokens touch, E (1 - (1 - K/E)^B) of the E on average
(routing taken as uniform): K experts at batch 1, all of them at large batch.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from tandem.bench.timing import per_call_s


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype_bytes: int
    # Bytes of the weights a decode step reads, when quantized (None: params x dtype_bytes).
    layer_weight_bytes: float | None = None
    lm_head_weight_bytes: float | None = None
    # Mixture of experts (num_experts 0: dense): sparse layers' experts, top_k per token,
    # each 3 x hidden x expert_intermediate_size, plus a shared expert's intermediate size
    num_experts: int = 0
    num_experts_per_tok: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    num_sparse_layers: int = 0

    @staticmethod
    def from_hf(cfg: dict, dtype: torch.dtype, quant=None) -> ModelShape:
        """`quant`: the QuantPolicy the engine applied, for the weights' byte counts."""
        heads = cfg["num_attention_heads"]
        shape = ModelShape(cfg["num_hidden_layers"], cfg["hidden_size"], heads,
                           cfg.get("num_key_value_heads") or heads,
                           cfg.get("head_dim") or cfg["hidden_size"] // heads,
                           cfg["intermediate_size"], cfg["vocab_size"],
                           bool(cfg.get("tie_word_embeddings", False)),
                           torch.empty((), dtype=dtype).element_size())
        from tandem.models.registry import model_class_for
        moe_args = getattr(model_class_for(cfg), "moe_args", None)
        if moe_args is not None:
            moe = moe_args(cfg)
            shape = dataclasses.replace(
                shape, num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                expert_intermediate_size=moe.intermediate_size,
                shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
                num_sparse_layers=sum(moe.is_sparse(i) for i in range(shape.num_layers)))
        if quant is None:
            return shape
        return dataclasses.replace(shape, **shape.quantized_bytes(quant))

    def quantized_bytes(self, quant) -> dict[str, float]:
        """Weight bytes per decode step under a QuantPolicy (bits per weight of each layer's
        method, scales included; unquantized layers at dtype_bytes)."""
        from tandem.quantization.methods import make_method
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        parts = {"self_attn.qkv_proj": h * d * (self.num_heads + 2 * self.num_kv_heads),
                 "self_attn.o_proj": h * d * self.num_heads, "mlp.gate_up_proj": 2 * h * i,
                 "mlp.down_proj": h * i}

        def nbytes(prefix: str, params: int) -> float:
            name = quant.method_for(prefix)
            bits = make_method(name).weight_bits if name else 8 * self.dtype_bytes
            return params * bits / 8

        layers = sum(nbytes(f"model.layers.{n}.{part}", p) for n in range(self.num_layers)
                     for part, p in parts.items())
        # a sparse layer has no dense MLP; its experts stay in the model dtype (layers/moe.py)
        layers -= self.num_sparse_layers * 3 * h * i * self.dtype_bytes
        layers += (self.num_sparse_layers * self._sparse_mlp_params(self.num_experts_per_tok)
                   * self.dtype_bytes)
        return {"layer_weight_bytes": layers,
                "lm_head_weight_bytes": nbytes("lm_head", self.lm_head_params)}

    @property
    def weight_bytes(self) -> float:
        """Bytes of the weights one batch-1 decode step reads (decoder linears, LM head)."""
        return self.weight_bytes_at(1)

    def weight_bytes_at(self, batch: int) -> float:
        """Bytes of the weights a decode step of `batch` tokens reads: with experts, those
        the batch touches (expected, uniform routing: E (1 - (1 - K/E)^batch) a layer)."""
        layers = self.layer_weight_bytes
        head = self.lm_head_weight_bytes
        out = ((self.layer_params * self.dtype_bytes if layers is None else layers)
               + (self.lm_head_params * self.dtype_bytes if head is None else head))
        if self.num_experts:
            e, k = self.num_experts, self.num_experts_per_tok
            touched = e * (1.0 - (1.0 - k / e) ** max(batch, 1))
            out += (self.num_sparse_layers * (touched - k) * 3 * self.hidden_size
                    * self.expert_intermediate_size * self.dtype_bytes)
        return out

    def _sparse_mlp_params(self, experts: float) -> float:
        """One sparse layer's MLP parameters with `experts` experts in use: the router,
        those experts, and the shared expert with its gate."""
        h = self.hidden_size
        shared = self.shared_expert_intermediate_size
        return (h * self.num_experts + experts * 3 * h * self.expert_intermediate_size
                + (3 * h * shared + h if shared else 0))

    @property
    def layer_params(self) -> int:
        """Linear parameters of all decoder layers that one token uses (norms are
        negligible): with experts, the sparse layers' active ones (top_k experts)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * h * self.intermediate_size
        sparse = self.num_sparse_layers
        return int(self.num_layers * attn + (self.num_layers - sparse) * mlp
                   + sparse * self._sparse_mlp_params(self.num_experts_per_tok))

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def attention_flops(self, context: int) -> int:
        """FLOPs of one token's attention over `context` keys, all layers."""
        return 4 * self.num_layers * self.num_heads * self.head_dim * context


@dataclass(frozen=True, slots=True)
class Workload:
    """Per request: prompt length, output length (every request computes all its tokens)."""

    requests: list[tuple[int, int]]
    max_batch: int  # most requests that run at once (KV pool and max_num_seqs)


def workload_flops(shape: ModelShape, w: Workload) -> float:
    flops = 0.0
    for p, o in w.requests:
        tokens = p + o - 1  # the last sampled token is never fed back
        flops += 2 * shape.layer_params * tokens + 2 * shape.lm_head_params * o
        # Token at position t attends over t + 1 keys: sum_{t<n} (t + 1) = n(n+1)/2.
        flops += shape.attention_flops(1) * tokens * (tokens + 1) / 2
    return flops


def workload_bytes(shape: ModelShape, w: Workload) -> float:
    """Weights once per decode step at the largest batch, plus K/V written and read."""
    outputs = sorted((o for _, o in w.requests), reverse=True)
    # Decode steps if requests run in waves of max_batch, longest first (a wave's steps
    # read the weights its batch touches: all of a dense model's, some experts).
    wave = max(1, w.max_batch)
    total = sum(outputs[i] * shape.weight_bytes_at(len(outputs[i:i + wave]))
                for i in range(0, len(outputs), wave))
    kv = shape.kv_bytes_per_token
    for p, o in w.requests:
        total += (p + o - 1) * kv  # every K/V written once
        total += p * kv  # prefill reads its own K/V once
        total += sum(p + t for t in range(1, o)) * kv  # each decode reads its context
    return total


BURSTS = 12  # GPU repeats after the back-to-back window
BURST_IDLE_S = 0.05  # idle before each: long enough for the clock to leave the power limit


@dataclass(frozen=True, slots=True)
class Rates:
    """The two ceilings: the best of many timed repeats (each `reps` back-to-back ops), run
    without pause for at least `window_s` and then as short bursts with an idle gap before
    each (GPU). The window ramps an idle GPU's clocks up; a long load then pulls them down to
    the power limit (an H200 at 700 W: ~667 TFLOP/s of back-to-back 8192^3 bf16 matmuls
    after the first 100 ms, against ~790 at 1,980 MHz). A benchmark run ends in either state,
    so the bursts, each after BURST_IDLE_S without work, read the unthrottled clock: 10
    matmuls after 50 ms idle ran at 788-792 TFLOP/s (scripts/diag_matmul_clock.py,
    bench/results/2026-12-02-h200-sixteenth-ee042ad). The best of all is the ceiling, so a
    fraction computed with it is never too high. On CPU in float32 the
    engine's own matmul (layers/cpu_gemm.py) is timed besides torch.mm, and the faster
    one sets the ceiling: torch.mm reaches less than half of it on the AVX-512 box."""

    matmul_flops_per_s: float  # best repeat: 2 n^3 per (n, n) x (n, n) product in `dtype`
    mem_bytes_per_s: float  # best repeat: a device-to-device copy, bytes read + written
    matmul_repeats: tuple[float, ...]  # (first, median, last) repeat's FLOP/s
    copy_repeats: tuple[float, ...]  # (first, median, last) repeat's bytes/s
    num_repeats: tuple[int, int]  # (matmul, copy) repeats timed
    matmul_n: int
    copy_bytes: int  # one copy's size (each copy moves twice this)
    window_s: float  # least seconds of each op timed, repeat after repeat
    matmul_ops: tuple[str, ...] = ("torch.mm",)  # the matmuls timed; the fastest counts
    bursts: int = 0  # repeats after the window, each after burst_idle_s without work
    burst_idle_s: float = 0.0

    def record(self) -> dict:
        """The JSON form benchmarks store under "rates"."""
        return {"method": f"best repeat of >= {self.window_s:g} s of each op timed back to "
                          f"back, then {self.bursts} after {self.burst_idle_s:g} s idle each "
                          "(repeats: first, median, last)",
                **dataclasses.asdict(self)}


def measure(device: torch.device, dtype: torch.dtype) -> Rates:
    """The matmul rate and copy bandwidth of `device` (`Rates`). CPU: short (tests call it)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    size = (1 << 30) if cuda else (1 << 27)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    if cuda:
        src.random_(0, 256)  # not zeros (METHOD.md: they can run faster than real data)
    dst = torch.empty_like(src)
    window_s = 1.0 if cuda else 0.0
    least = 5 if cuda else 3
    bursts, idle_s = (BURSTS, BURST_IDLE_S) if cuda else (0, 0.0)

    def repeats(fn, reps: int) -> list[float]:
        """Seconds per op of each repeat: timed back to back for window_s (least repeats),
        then `bursts` more, each after idle_s without work."""
        fn()  # compilation, handles: untimed
        if cuda:
            torch.cuda.synchronize(device)
        times: list[float] = []
        t0 = time.perf_counter()
        while len(times) < least or time.perf_counter() - t0 < window_s:
            times.append(per_call_s(fn, reps, cuda))
        for _ in range(bursts):
            time.sleep(idle_s)
            times.append(per_call_s(fn, reps, cuda))
        return times

    mm = [2 * n**3 / t for t in repeats(lambda: torch.mm(a, b), 10 if cuda else 1)]
    ops = ("torch.mm",)
    if not cuda and dtype == torch.float32:  # the engine's own CPU matmul, when faster
        from tandem.layers import cpu_gemm
        bt = b.t().contiguous()
        packed = cpu_gemm.pack_weight(bt)
        if packed is not None:
            mm += [2 * n**3 / t for t in repeats(lambda: cpu_gemm.linear(a, bt, packed), 1)]
            ops += (f"cpu_gemm {packed.kind}",)
    cp = [2 * size / t for t in repeats(lambda: dst.copy_(src), 10 if cuda else 2)]

    def summary(r: list[float]) -> tuple[float, ...]:
        return r[0], sorted(r)[len(r) // 2], r[-1]

    return Rates(max(mm), max(cp), summary(mm), summary(cp), (len(mm), len(cp)), n, size,
                 window_s, ops, bursts, idle_s)


def measure_rates(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(matmul FLOP/s in `dtype`, memory bytes/s counting reads and writes) on `device`,
    measured warm (`measure`)."""
    rates = measure(device, dtype)
    return rates.matmul_flops_per_s, rates.mem_bytes_per_s


def roofline_seconds(shape: ModelShape, w: Workload, flops_rate: float, bw: float
                     ) -> tuple[float, float, float]:
    """(roofline_s, compute-bound seconds, memory-bound seconds)."""
    c = workload_flops(shape, w) / flops_rate
    m = workload_bytes(shape, w) / bw
    return max(c, m), c, m
