"""Batch-1 decode of a dense Llama-family model without RMSNorm kernels: each norm is carried
by the matmuls around it (kernels/reference/carried_norm.py). The matmul before a norm (o_proj,
down_proj) adds the residual in its epilogue and stores the new residual s, xn = s * w_norm
and its programs' sums of s^2; the matmul after it (qkv_proj, gate_up_proj) reads xn as its
input and multiplies its finished dot by rsqrt(mean(s^2) + eps):

    plain  [add+norm] [qkv] [rotary+kv] [attention] [o] [add+norm] [gate_up] [silu] [down]
    chain             [qkv] [rotary+kv] [attention] [o+add+norm]   [gate_up] [silu] [down+add+norm]

Two launches fewer a layer. (SiLU-and-mul in gate_up's epilogue as well, a program owning
gate row j and up row I + j, measured slower: int4 replay 1.924 against 1.900 ms; removed.)
Layer 0's input norm stays a kernel (no matmul comes before it), and the last layer's
down_proj hands its plain output to the final norm. Same function as
LlamaDecoderLayer, the same rounding of the residual stream; the normalized rows agree to the
dtype's rounding (carried_norm.py says why not to the bit).

FP8 W8A8 (the one-row cast kernel) carries norms too, and its consumers take the producers'
max |xn| with the sums of squares: they quantize xn to e4m3 without a pass over the row. On
CUDA only where that kernel takes the width (ops.fp8_row_kernel), and not with
TANDEM_FP8_DECODE=dot.

Possible (`chainable`) in half precision when every layer has a dense MLP and all four
matmuls' methods carry norms (unquantized, int8, int4, FP8 W8A8), with one rank. On by default for
quantized weights only: on the H200 (Llama-3.1-8B shapes, batch 1, graph replay) it took
int4 1.944 -> 1.900 ms and int8 2.381 -> 2.356, but bf16 3.819 -> 3.858 (the partial sums'
load and reduction at the end of every consumer program cost more than the norm launches
there; bench/results/2026-12-01-h200-norm-chain/). TANDEM_NORM_CHAIN=all chains bf16 too,
=0 never. The runner captures the chain in its batch-1 CUDA graph.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem import envs
from tandem.kernels.reference.carried_norm import AddNorm, NormedRow
from tandem.layers.activation import SiluAndMul
from tandem.layers.attention_metadata import AttentionMetadata
from tandem.layers.linear_method import UnquantizedLinearMethod


def _linears(layer: nn.Module) -> tuple[nn.Module, ...] | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not (hasattr(attn, "attend_qkv") and isinstance(getattr(mlp, "act_fn", None), SiluAndMul)
            and hasattr(mlp, "gate_up_proj")):
        return None
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


def _survey(model: nn.Module) -> tuple[bool, bool]:
    """(every layer can chain, every chained matmul is quantized), computed once."""
    found = getattr(model, "_norm_chain", None)
    if found is None:
        per_layer = [_linears(layer) for layer in model.layers]
        linears = [lin for group in per_layer if group is not None for lin in group]
        capable = (model.embed_tokens.weight.dtype in (torch.bfloat16, torch.float16)
                   and all(group is not None for group in per_layer)
                   and all(lin.parallel.tp_size == 1 and lin.method.carries_norm(lin)
                           for lin in linears))
        quantized = capable and not any(isinstance(lin.method, UnquantizedLinearMethod)
                                        for lin in linears)
        found = model._norm_chain = (capable, quantized)
    return found


def chainable(model: nn.Module) -> bool:
    """Whether every layer of `model` (a LlamaModel) can run the chain."""
    return _survey(model)[0]


def applies(model: nn.Module, input_ids: torch.Tensor) -> bool:
    """One token on CUDA, the chain switched on for this model (TANDEM_NORM_CHAIN: by
    default for quantized weights only, where it measured faster) and possible."""
    if input_ids.shape[0] != 1 or not input_ids.is_cuda:
        return False
    mode = envs.norm_chain_mode()
    return mode != "off" and chainable(model) and (mode == "all" or _survey(model)[1])


def _apply(linear: nn.Module, x: torch.Tensor | NormedRow, add: AddNorm | None = None
           ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
    return linear.method.apply_carried(linear, x, linear.bias, add)


def _add_norm(residual: torch.Tensor, norm: nn.Module, consumer: nn.Module) -> AddNorm:
    """The producer's epilogue for `norm`, whose output `consumer` multiplies (an FP8 W8A8
    consumer also takes the producer's max |xn|)."""
    return AddNorm(residual, norm.weight, norm.eps, consumer.method.carried_amax)


def decoder_layer(layer: nn.Module, positions: torch.Tensor, x: torch.Tensor | NormedRow,
                  residual: torch.Tensor, meta: AttentionMetadata,
                  next_layer: nn.Module | None
                  ) -> tuple[torch.Tensor | NormedRow, torch.Tensor]:
    """One layer: x is its input norm's output (NormedRow, or a tensor for layer 0) ->
    (next_layer's input norm's NormedRow, or the plain output when next_layer is None; the
    residual)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = _apply(attn.qkv_proj, x)
    x, residual = _apply(attn.o_proj, attn.attend_qkv(positions, qkv, meta),
                         _add_norm(residual, layer.post_attention_layernorm, mlp.gate_up_proj))
    act = mlp.act_fn(_apply(mlp.gate_up_proj, x))
    if next_layer is None:
        return _apply(mlp.down_proj, act), residual
    return _apply(mlp.down_proj, act, _add_norm(residual, next_layer.input_layernorm,
                                                next_layer.self_attn.qkv_proj))


def forward(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
    """LlamaModel.forward for one token: the final-normed hidden state (1, hidden)."""
    layers = model.layers
    residual = model.embed_tokens(input_ids)
    x = layers[0].input_layernorm(residual)
    for i, layer in enumerate(layers):
        x, residual = decoder_layer(layer, positions, x, residual, meta,
                                    layers[i + 1] if i + 1 < len(layers) else None)
    hidden, _ = model.norm(x, residual)
    return hidden
