"""Mixture-of-experts relatives of Llama: the same attention, with the MLP of some (or all)
layers replaced by a sparse block of experts (layers/moe.py).

    SparseMoeBlock:  logits = gate(x)                          (T, E)
                     weights, ids = top_k(softmax(logits))     renormalized or not
                     out = experts(x, weights, ids)            (+ shared expert: Qwen2-MoE)

    Mixtral      every layer sparse (`block_sparse_moe`), experts w1 (gate) / w3 (up) /
                 w2 (down), top-k weights always renormalized; no biases
    Qwen2-MoE    q/k/v biases; layers sparse where (i + 1) % decoder_sparse_step == 0 and i
                 not in mlp_only_layers (the others a dense MLP of intermediate_size); a
                 shared expert (shared_expert_intermediate_size) on every token, scaled by
                 sigmoid(shared_expert_gate(x)); renormalized if norm_topk_prob
    Qwen3-MoE    Qwen2-MoE's routing without the shared expert, and Qwen3's q/k RMSNorm

Checkpoint names: each expert's tensors (`...experts.{e}.gate_proj.weight`, or w1/w3/w2)
go to the stacked `experts.w13_weight` / `experts.w2_weight` through FusedMoE's loader;
Mixtral's `block_sparse_moe` is this code's `mlp`; the rest loads as for Llama.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tandem.distributed.parallel import ParallelContext
from tandem.kernels import AttentionBackend
from tandem.layers.linear import ReplicatedLinear
from tandem.layers.moe import FusedMoE, select_experts
from tandem.layers.norm import PartialSums, RMSNorm
from tandem.models.llama import (LlamaArgs, LlamaAttention, LlamaDecoderLayer,
                                 LlamaForCausalLM, LlamaMLP)
from tandem.quantization.policy import QuantPolicy

logger = logging.getLogger(__name__)

# ...experts.<e>.<proj>.weight -> (the FusedMoE's path, shard id, expert)
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_SHARD = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "w1": "w1", "w2": "w2",
          "w3": "w3"}
# transformers' own stacked layout: ...experts.gate_up_proj (E, 2I, H), ...down_proj (E, H, I)
_STACKED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True, slots=True)
class MoEArgs:
    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    renormalize: bool  # top-k weights rescaled to sum to 1
    shared_expert_intermediate_size: int  # 0: no shared expert
    sparse_step: int  # layer i is sparse if (i + 1) % sparse_step == 0 ...
    dense_layers: frozenset[int]  # ... and i is not listed here

    def is_sparse(self, layer: int) -> bool:
        return (layer + 1) % self.sparse_step == 0 and layer not in self.dense_layers


class SparseMoeBlock(nn.Module):
    def __init__(self, args: LlamaArgs, moe: MoEArgs, prefix: str, parallel: ParallelContext,
                 quant: QuantPolicy | None) -> None:
        super().__init__()
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        # the router stays unquantized: tiny, and its choices steer everything after it
        self.gate = ReplicatedLinear(args.hidden_size, moe.num_experts, False,
                                     f"{prefix}.gate", parallel)
        self.experts = FusedMoE(moe.num_experts, moe.top_k, args.hidden_size,
                                moe.intermediate_size, f"{prefix}.experts", parallel)
        self.shared_expert = self.shared_expert_gate = None
        if moe.shared_expert_intermediate_size:
            shared = dataclasses.replace(
                args, intermediate_size=moe.shared_expert_intermediate_size, mlp_bias=False)
            self.shared_expert = LlamaMLP(shared, f"{prefix}.shared_expert", parallel, quant)
            self.shared_expert_gate = ReplicatedLinear(args.hidden_size, 1, False,
                                                       f"{prefix}.shared_expert_gate", parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor | PartialSums:
        """(T, H), or without a shared expert possibly PartialSums: the experts' K outputs,
        which the next layer's input RMSNorm (or the final norm) sums with its residual add."""
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)  # (T, K)
        if self.shared_expert is None:
            return self.experts(x, weights, ids, reduce=False)
        out = self.experts(x, weights, ids)  # (T, H)
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class MoEDecoderLayer(LlamaDecoderLayer):
    """Llama's layer with `mlp` a SparseMoeBlock (or, in Qwen's dense layers, a LlamaMLP)."""

    def __init__(self, args: LlamaArgs, moe: MoEArgs, index: int,
                 backend: AttentionBackend | None, prefix: str, parallel: ParallelContext,
                 quant: QuantPolicy | None) -> None:
        nn.Module.__init__(self)
        self.self_attn = LlamaAttention(args, backend, f"{prefix}.self_attn", parallel, quant)
        self.mlp = (SparseMoeBlock(args, moe, f"{prefix}.mlp", parallel, quant)
                    if moe.is_sparse(index) else LlamaMLP(args, f"{prefix}.mlp", parallel, quant))
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    @staticmethod
    def arch_flags(hf: dict[str, Any]) -> dict[str, bool]:
        return dict(qkv_bias=bool(hf.get("qkv_bias", True)), o_bias=False, mlp_bias=False,
                    qk_norm=False)

    @staticmethod
    def moe_args(hf: dict[str, Any]) -> MoEArgs:
        return MoEArgs(
            num_experts=hf.get("num_experts") or hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"], intermediate_size=hf["moe_intermediate_size"],
            renormalize=bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0),
            sparse_step=hf.get("decoder_sparse_step", 1) or 1,
            dense_layers=frozenset(hf.get("mlp_only_layers") or ()))

    def layer_factory(self, hf_config: dict[str, Any], args: LlamaArgs,
                      backend: AttentionBackend | None, parallel: ParallelContext,
                      quant: QuantPolicy | None) -> Callable[[int, str], nn.Module]:
        moe = self.moe_args(hf_config)
        if quant is not None:
            logger.warning("quantization applies to attention and dense MLPs; the experts "
                           "of %s stay in the model dtype (layers/moe.py)",
                           type(self).__name__)
        if moe.top_k > moe.num_experts:
            raise ValueError(f"num_experts_per_tok ({moe.top_k}) exceeds the "
                             f"{moe.num_experts} experts")
        return lambda i, prefix: MoEDecoderLayer(args, moe, i, backend, prefix, parallel, quant)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Experts' tensors into the stacked FusedMoE parameters, the rest as for Llama."""
        experts = {name: m for name, m in self.named_modules() if isinstance(m, FusedMoE)}

        def dense() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = self.rename(name)
                hit = _EXPERT.match(name)
                stacked = _STACKED.match(name)
                if hit is None and stacked is None:
                    yield name, tensor
                    continue
                module = experts.get((hit or stacked).group(1))
                if module is None:
                    raise ValueError(f"unexpected tensor {name!r} in checkpoint: "
                                     f"{type(self).__name__} has no experts there")
                try:
                    if hit is not None:
                        module.weight_loader(None, tensor, _SHARD[hit.group(3)],
                                             int(hit.group(2)))
                    else:
                        module.load_stacked(stacked.group(2), tensor)
                except ValueError as err:
                    raise ValueError(f"tensor {name!r}: {err}") from None

        loaded = super().load_weights(dense())
        for path, module in experts.items():
            if module.is_loaded():
                loaded |= {f"{path}.w13_weight", f"{path}.w2_weight"}
        return loaded

    @staticmethod
    def rename(name: str) -> str:
        """A checkpoint name in this code's module tree."""
        return name


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    @staticmethod
    def arch_flags(hf: dict[str, Any]) -> dict[str, bool]:
        bias = bool(hf.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)

    @staticmethod
    def moe_args(hf: dict[str, Any]) -> MoEArgs:
        return dataclasses.replace(Qwen2MoeForCausalLM.moe_args(hf),
                                   shared_expert_intermediate_size=0)


class MixtralForCausalLM(Qwen2MoeForCausalLM):
    @staticmethod
    def arch_flags(hf: dict[str, Any]) -> dict[str, bool]:
        return dict(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)

    @staticmethod
    def moe_args(hf: dict[str, Any]) -> MoEArgs:
        return MoEArgs(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                       intermediate_size=hf["intermediate_size"], renormalize=True,
                       shared_expert_intermediate_size=0, sparse_step=1,
                       dense_layers=frozenset())

    @staticmethod
    def rename(name: str) -> str:
        return name.replace(".block_sparse_moe.", ".mlp.")
