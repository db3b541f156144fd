"""The sensitivity map: what quantizing ONE part of a model at a time costs in quality, and
the per-layer policy built from it.

    parts    each decoder layer's attention projections (qkv_proj, o_proj) and MLP
             projections (gate_up_proj, down_proj), and the LM head
    probes   the model with only that part quantized by one method, against the
             unquantized model on the same held-out token windows
    quality  KL(base || probe) of the next-token distribution (nats per token), the relative
             increase of bits per byte (= of summed -log2 p(next token)), top-1 agreement
    activations  per part, probe(fp8 W8A8) - probe(fp8 weights only): what quantizing the
             activations adds on top of the same weights
    KV cache per layer, the model with only that layer's K/V cache in FP8 (scale 1.0)
    attention computation  per layer, the model with only that layer's QK^T / softmax / PV
             in emulated FP8 (`Attention.fp8_attention`, `reference.attention.fp8_sdpa`:
             e4m3 Q, K, V with per-tensor dynamic scales, e4m3 P with scale 1)

The policy (`build_policy`) starts every part at its fewest-bits method and upgrades the
parts whose measured KL falls most per extra bit, while the parameter-weighted average
bits per weight stays within `target_bits` (or until the predicted bits-per-byte increase,
the sum of the parts' own, is within `max_bpb_increase`). It treats the parts' costs as
additive; `tandem eval --quantization POLICY` checks what that prediction is worth. It
chooses weight methods only: fp8 weights-only, the KV cache and the attention computation
are measurements (`MEASUREMENTS`). The KV dtype is a separate engine flag, and tandem has
no FP8 attention kernel, so there is no attention precision to choose.

Probes load the model again with a one-rule `QuantPolicy`, so every probe runs exactly
the code the engine serves with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tandem.layers.attention_metadata import AttentionMetadata
from tandem.models.loader import load_model, read_hf_config
from tandem.quantization.methods import make_method
from tandem.quantization.policy import NONE, QuantPolicy
from tandem.runner.kv_memory import LayerKVSpec, allocate_kv_caches

WEIGHT_METHODS = ("int4_asym_g256", "int4", "int4_asym", "int4_asym_g64", "int8", "fp8")
MEASUREMENTS = ("fp8_weight_only", "fp8_kv", "fp8_attn")  # probed, never chosen by a policy


@dataclass(frozen=True, slots=True)
class Part:
    name: str  # e.g. "layer 3 attn", "lm_head"
    pattern: str  # the policy rule that selects it
    params: int  # weights in the part
    layer: int | None  # None for the LM head
    kind: str  # "attn" | "mlp" | "lm_head"


@dataclass(frozen=True, slots=True)
class Probe:
    part: str
    method: str
    bits: float  # bits per weight of the method (scales included)
    kl: float  # mean KL(base || probe), nats per token
    bpb_increase: float  # relative increase of summed bits (0.01 = +1%)
    top1: float  # fraction of positions whose argmax agrees with the base model


def model_parts(hf: dict) -> list[Part]:
    h = hf["hidden_size"]
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    d = hf.get("head_dim") or h // heads
    attn = h * d * (2 * heads + 2 * kv)
    mlp = 3 * h * hf["intermediate_size"]
    parts = []
    for i in range(hf["num_hidden_layers"]):
        parts.append(Part(f"layer {i} attn", f"model.layers.{i}.self_attn.*", attn, i, "attn"))
        parts.append(Part(f"layer {i} mlp", f"model.layers.{i}.mlp.*", mlp, i, "mlp"))
    parts.append(Part("lm_head", "lm_head", h * hf["vocab_size"], None, "lm_head"))
    return parts


def scratch_prefill(model: torch.nn.Module, lens: list[int], block_size: int = 16,
                    fp8_kv_layers: frozenset[int] = frozenset(),
                    fp8_attn_layers: frozenset[int] = frozenset()) -> AttentionMetadata:
    """Give the model's attention layers a fresh KV cache (float32; FP8 with scale 1.0 in
    fp8_kv_layers; emulated FP8 attention math in fp8_attn_layers) and return the metadata
    of one prefill of sequences of these lengths, each in its own blocks: for running the
    model outside the engine (the sensitivity probes, GPTQ calibration)."""
    device = next(model.buffers(), next(model.parameters())).device
    blocks = [-(-t // block_size) for t in lens]
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    spec = [LayerKVSpec(torch.float8_e4m3fn if i in fp8_kv_layers else torch.float32)
            for i in range(model.num_layers)]
    caches = allocate_kv_caches(model.num_layers, sum(blocks), block_size, model.num_kv_heads,
                                model.head_dim, spec, device)
    for i, (layer, cache) in enumerate(zip(model.attention_layers(), caches)):
        layer.kv_cache, layer.kv_scale = cache, (1.0, 1.0)
        layer.fp8_attention = i in fp8_attn_layers
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    for i, (b, n) in enumerate(zip(starts, blocks)):
        table[i, :n] = torch.arange(b, b + n)
    return AttentionMetadata(
        slot_mapping=torch.cat([b * block_size + torch.arange(t)
                                for b, t in zip(starts, lens)]).to(device),
        query_start_loc=torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))],
                                     dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=table.to(device), query_lens_cpu=list(lens), seq_lens_cpu=list(lens),
        max_query_len=max(lens), max_seq_len=max(lens), block_size=block_size)


def sequence_logprobs(model: torch.nn.Module, ids: list[int], block_size: int = 16,
                      fp8_kv_layers: frozenset[int] = frozenset(),
                      fp8_attn_layers: frozenset[int] = frozenset()) -> torch.Tensor:
    """log-softmax of the next-token logits at every position of one sequence, (T, vocab)
    float32, through the model's own paged attention on a scratch KV cache
    (scratch_prefill)."""
    t = len(ids)
    meta = scratch_prefill(model, [t], block_size, fp8_kv_layers, fp8_attn_layers)
    device = meta.seq_lens.device
    with torch.inference_mode():
        hidden = model(torch.tensor(ids, device=device), torch.arange(t, device=device), meta)
        return model.compute_logits(hidden).float().log_softmax(-1)


class Measurer:
    """The base model's next-token distributions on `windows`, and probes against them."""

    def __init__(self, model_dir: str, windows: list[list[int]], device: str = "cpu") -> None:
        self.model_dir, self.windows = model_dir, windows
        self.device = torch.device(device)
        self.dtype = torch.float32
        base = self._load(None)
        self.base = [sequence_logprobs(base, w) for w in self.windows]
        self.base_bits = sum(self._bits(lp, w) for lp, w in zip(self.base, self.windows))

    def _load(self, quant: QuantPolicy | None) -> torch.nn.Module:
        return load_model(self.model_dir, self.dtype, self.device, quant=quant)

    @staticmethod
    def _bits(lp: torch.Tensor, ids: list[int]) -> float:
        targets = torch.tensor(ids[1:], device=lp.device)
        return -lp[:-1].gather(1, targets[:, None]).sum().item() / math.log(2)

    def measure(self, policy: QuantPolicy | None, fp8_kv_layers: frozenset[int] = frozenset(),
                fp8_attn_layers: frozenset[int] = frozenset()) -> tuple[float, float, float]:
        """(mean KL nats/token, relative bits increase, top-1 agreement) of the model under
        `policy` (and FP8 K/V in fp8_kv_layers, FP8 attention math in fp8_attn_layers)
        against the base."""
        model = self._load(policy)
        kl_sum, agree, positions, bits = 0.0, 0, 0, 0.0
        for base, ids in zip(self.base, self.windows):
            lp = sequence_logprobs(model, ids, fp8_kv_layers=fp8_kv_layers,
                                   fp8_attn_layers=fp8_attn_layers)
            kl_sum += (base.exp() * (base - lp)).sum().item()
            agree += (base.argmax(-1) == lp.argmax(-1)).sum().item()
            positions += len(ids)
            bits += self._bits(lp, ids)
        return kl_sum / positions, bits / self.base_bits - 1.0, agree / positions

    def probe(self, part: Part, method: str) -> Probe:
        kl, bpb, top1 = self.measure(QuantPolicy(NONE, ((part.pattern, method),)))
        return Probe(part.name, method, make_method(method).weight_bits, kl, bpb, top1)

    def probe_kv(self, layer: int) -> Probe:
        """Only `layer`'s KV cache in FP8 (e4m3, scale 1.0)."""
        kl, bpb, top1 = self.measure(None, frozenset({layer}))
        return Probe(f"layer {layer} kv", "fp8_kv", 8.0, kl, bpb, top1)

    def probe_attn(self, layer: int) -> Probe:
        """Only `layer`'s attention computation (QK^T, softmax, PV) in emulated FP8; its
        projections and KV cache stay exact."""
        kl, bpb, top1 = self.measure(None, fp8_attn_layers=frozenset({layer}))
        return Probe(f"layer {layer} attn_compute", "fp8_attn", 8.0, kl, bpb, top1)


def build_policy(parts: list[Part], probes: list[Probe], full_bits: float,
                 target_bits: float | None = None, max_bpb_increase: float | None = None
                 ) -> tuple[QuantPolicy, dict]:
    """Choose a method per part (see the module docstring); returns the policy and its
    predicted average bits, KL and bits-per-byte increase."""
    if (target_bits is None) == (max_bpb_increase is None):
        raise ValueError("give exactly one of target_bits and max_bpb_increase")
    by_part: dict[str, list[Probe]] = {}
    for p in probes:
        if p.method not in MEASUREMENTS:
            by_part.setdefault(p.part, []).append(p)
    # per part: options sorted by bits, each (bits, kl, bpb, method); unquantized last
    options = {part.name: sorted([(p.bits, p.kl, p.bpb_increase, p.method)
                                  for p in by_part.get(part.name, [])])
               + [(full_bits, 0.0, 0.0, NONE)] for part in parts}
    choice = {part.name: 0 for part in parts}
    total = sum(part.params for part in parts)

    def avg_bits() -> float:
        return sum(options[p.name][choice[p.name]][0] * p.params for p in parts) / total

    def predicted_bpb() -> float:
        return sum(options[p.name][choice[p.name]][2] for p in parts)

    while True:
        if max_bpb_increase is not None and predicted_bpb() <= max_bpb_increase:
            break
        best = None
        for p in parts:
            bits, kl = options[p.name][choice[p.name]][:2]
            for j in range(choice[p.name] + 1, len(options[p.name])):
                nbits, nkl = options[p.name][j][:2]
                if nkl >= kl:
                    continue
                extra = (nbits - bits) * p.params / total
                if target_bits is not None and avg_bits() + extra > target_bits + 1e-9:
                    continue
                gain = (kl - nkl) / max(extra, 1e-12)
                if best is None or gain > best[0]:
                    best = (gain, p.name, j)
        if best is None:
            break
        choice[best[1]] = best[2]
    rules = tuple((p.pattern, options[p.name][choice[p.name]][3]) for p in parts)
    predicted = {"avg_bits": avg_bits(), "kl": sum(options[p.name][choice[p.name]][1]
                                                   for p in parts),
                 "bpb_increase": predicted_bpb()}
    return QuantPolicy(NONE, rules, source="sensitivity"), predicted


def full_precision_bits(model_dir: str) -> float:
    """Bits per weight of the checkpoint's floats (what 'none' keeps)."""
    dtype = read_hf_config(model_dir).get("torch_dtype") or "float32"
    return 16.0 if dtype in ("bfloat16", "float16") else 32.0
