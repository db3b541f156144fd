"""Llama and its close relatives, written like the paper: pre-norm decoder layers of
grouped-query attention with rotary positions and a SwiGLU MLP.

    input_ids (T,) -> embed_tokens -> [LlamaDecoderLayer] x L -> norm -> hidden (T, hidden)
    LlamaDecoderLayer:  h = h + attn(rmsnorm(h));  h = h + mlp(rmsnorm(h))
    attn:  qkv_proj -> (q_norm, k_norm: Qwen3) -> rotary -> paged attention -> o_proj
           (on CUDA the norms, rotary and the K/V write are one kernel: rotary_write_kv;
           at decode they run inside the attention launch: Attention.rotary_attend)
    mlp:   down_proj(silu(gate_proj(x)) * up_proj(x)), gate and up fused as gate_up_proj

The relatives differ only in flags (`arch_flags`): Mistral has no biases; Qwen2 always
biases q/k/v; Qwen3 adds a per-head RMSNorm on q and k before rotary and usually sets
`head_dim` explicitly. The residual add is fused into the next RMSNorm, so a layer takes and
returns (hidden, residual). One token on CUDA with int8/int4 weights runs norm_chain.py
instead: each RMSNorm carried by the matmuls around it, two launches fewer a layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tandem.kernels import AttentionBackend
from tandem.layers import cpu_gemm
from tandem.layers.activation import SiluAndMul
from tandem.layers.attention import Attention
from tandem.layers.attention_metadata import AttentionMetadata
from tandem.distributed.parallel import ParallelContext
from tandem.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tandem.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                  RowParallelLinear)
from tandem.layers.norm import RMSNorm
from tandem.layers.rotary import RotaryEmbedding, rope_parameters
from tandem.models import norm_chain
from tandem.quantization.policy import QuantPolicy

logger = logging.getLogger(__name__)

# Checkpoint tensor name part -> (merged parameter name part, shard id of its weight_loader).
STACKED_PARAMS = {".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"),
                  ".v_proj.": (".qkv_proj.", "v"), ".gate_proj.": (".gate_up_proj.", 0),
                  ".up_proj.": (".gate_up_proj.", 1)}
# Buffers some old checkpoints saved; compressed-tensors' record of the unpacked shape; an
# FP8 KV cache's scales (the runner reads them: compressed_tensors.checkpoint_kv_scales).
IGNORED_TENSORS = ("rotary_emb.inv_freq", ".weight_shape", ".self_attn.k_scale",
                   ".self_attn.v_scale")


@dataclass(frozen=True, slots=True)
class LlamaArgs:
    """The fields of a Hugging Face config.json that this family reads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None  # None: full attention (a window >= max positions is none)

    @staticmethod
    def from_hf(hf: dict[str, Any], flags: dict[str, bool]) -> LlamaArgs:
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only silu")
        num_heads = hf["num_attention_heads"]
        max_pos = hf.get("max_position_embeddings", 4096)
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        theta, scaling = rope_parameters(hf)
        return LlamaArgs(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), max_position_embeddings=max_pos,
            rope_theta=theta, rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window if window is not None and window < max_pos else None,
            **flags)


class LlamaAttention(nn.Module):
    def __init__(self, args: LlamaArgs, backend: AttentionBackend | None, prefix: str,
                 parallel: ParallelContext, quant: QuantPolicy | None) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(args.hidden_size, args.head_dim, args.num_heads,
                                          args.num_kv_heads, args.qkv_bias,
                                          f"{prefix}.qkv_proj", parallel, quant)
        self.o_proj = RowParallelLinear(args.num_heads * args.head_dim, args.hidden_size,
                                        args.o_bias, f"{prefix}.o_proj", parallel, quant)
        # This rank's heads (all of them with one rank).
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = args.head_dim
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.max_position_embeddings,
                                          args.rope_theta, args.rope_scaling)
        self.attn = Attention(self.num_heads, args.head_dim, args.head_dim ** -0.5,
                              self.num_kv_heads, backend)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.o_proj(self.attend_qkv(positions, self.qkv_proj(hidden), meta))

    def attend_qkv(self, positions: torch.Tensor, qkv: torch.Tensor,
                   meta: AttentionMetadata) -> torch.Tensor:
        """qkv_proj's output (T, (H + 2 Hkv) D) -> attention's (T, H D), before o_proj."""
        num_tokens = qkv.shape[0]
        q, k, v = self.qkv_proj.split(qkv)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        # Qwen3: RMSNorm over each head's D before rotary; then the K/V write and attention
        # (one kernel for the three at decode on CUDA, two otherwise)
        norms = (self.q_norm, self.k_norm) if hasattr(self, "q_norm") else None
        return self.attn.rotary_attend(positions, q, k, v, self.rotary_emb.cos_cache,
                                       self.rotary_emb.sin_cache, norms, meta)


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs, prefix: str, parallel: ParallelContext,
                 quant: QuantPolicy | None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            args.hidden_size, [args.intermediate_size] * 2, args.mlp_bias,
            f"{prefix}.gate_up_proj", parallel, quant)
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(args.intermediate_size, args.hidden_size,
                                           args.mlp_bias, f"{prefix}.down_proj", parallel, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_gemm.in_row_chunks(self._forward, x, self.down_proj.output_size)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x, silu_mul=True))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, backend: AttentionBackend | None, prefix: str,
                 parallel: ParallelContext, quant: QuantPolicy | None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, backend, f"{prefix}.self_attn", parallel, quant)
        self.mlp = LlamaMLP(args, f"{prefix}.mlp", parallel, quant)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs, backend: AttentionBackend | None, prefix: str,
                 parallel: ParallelContext, quant: QuantPolicy | None,
                 make_layer: Callable[[int, str], nn.Module] | None = None) -> None:
        """make_layer(index, prefix): the decoder layer (default LlamaDecoderLayer; the
        mixture-of-experts models swap the MLP of some layers)."""
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size,
                                                   f"{prefix}.embed_tokens", parallel)
        make_layer = make_layer or (lambda i, name: LlamaDecoderLayer(args, backend, name,
                                                                      parallel, quant))
        self.layers = nn.ModuleList(make_layer(i, f"{prefix}.layers.{i}")
                                    for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if norm_chain.applies(self, input_ids):  # one token on CUDA: no norm kernels
            return norm_chain.forward(self, input_ids, positions, meta)
        hidden, residual = self.embed_tokens(input_ids), None  # (T, hidden)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The model the runner drives: forward -> hidden states, compute_logits -> logits."""

    @staticmethod
    def arch_flags(hf: dict[str, Any]) -> dict[str, bool]:
        bias = bool(hf.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                    qk_norm=False)

    def __init__(self, hf_config: dict[str, Any], attn_backend: AttentionBackend | None = None,
                 parallel: ParallelContext | None = None,
                 quant: QuantPolicy | None = None) -> None:
        """`parallel`: this rank's place in the tensor-parallel group; every layer gets it
        (and its module path) at construction and holds only its shard. `quant`: which
        linear layers are quantized, and how."""
        super().__init__()
        parallel = parallel or ParallelContext.single()
        self.args = args = LlamaArgs.from_hf(hf_config, self.arch_flags(hf_config))
        # What the runner reads to size and bind the KV cache (this rank's kv heads), and to
        # bound the context.
        self.num_layers = args.num_layers
        self.head_dim = args.head_dim
        self.vocab_size, self.hidden_size = args.vocab_size, args.hidden_size
        self.max_position_embeddings = args.max_position_embeddings
        self.sliding_window = args.sliding_window
        self.tie_word_embeddings = args.tie_word_embeddings
        if args.sliding_window is not None:
            logger.warning("sliding_window=%d is not implemented: attention is full, so outputs "
                           "are exact only up to %d tokens (clamp max_model_len to it)",
                           args.sliding_window, args.sliding_window)
        self.model = LlamaModel(args, attn_backend, "model", parallel, quant,
                                self.layer_factory(hf_config, args, attn_backend, parallel,
                                                   quant))
        self.num_kv_heads = self.model.layers[0].self_attn.num_kv_heads
        self.lm_head = ParallelLMHead(args.vocab_size, args.hidden_size, "lm_head", parallel,
                                      quant)
        if args.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def layer_factory(self, hf_config: dict[str, Any], args: LlamaArgs,
                      backend: AttentionBackend | None, parallel: ParallelContext,
                      quant: QuantPolicy | None) -> Callable[[int, str], nn.Module] | None:
        """The decoder layers' maker (None: LlamaDecoderLayer throughout)."""
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (T,) -> final-normed hidden states (T, hidden)."""
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab_size), in the model dtype."""
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into parameters; return the fully loaded names.

        A merged parameter counts as loaded once every shard in its `shard_ids` arrived.
        Raises ValueError naming the tensor on a shape mismatch or an unknown name.
        """
        params = dict(self.named_parameters())
        shards_seen: dict[str, set] = {}
        for name, tensor in weights:
            if any(part in name for part in IGNORED_TENSORS):
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied: the head is the embedding
            target, shard_id = name, None
            for part, (merged, shard) in STACKED_PARAMS.items():
                if part in name:
                    target, shard_id = name.replace(part, merged), shard
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(f"unexpected tensor {name!r} in checkpoint: "
                                 f"{type(self).__name__} has no parameter {target!r}")
            convert = getattr(param, "from_checkpoint", None)
            try:
                if convert is not None:  # stored in a layout no shard can be cut from
                    tensor = convert(tensor)
                if shard_id is None:
                    param.weight_loader(param, tensor)
                else:
                    param.weight_loader(param, tensor, shard_id)
            except ValueError as err:
                raise ValueError(f"tensor {name!r}: {err}") from None
            shards_seen.setdefault(target, set()).add(shard_id)
        return {name for name, seen in shards_seen.items()
                if None in seen or seen >= set(getattr(params[name], "shard_ids", ()))}


class MistralForCausalLM(LlamaForCausalLM):
    """Llama without any bias (a finite sliding_window is only warned about)."""

    @staticmethod
    def arch_flags(hf: dict[str, Any]) -> dict[str, bool]:
        return dict(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with biased q/k/v projections (always; o_proj and the MLP have none)."""

    @staticmethod
    def arch_flags(hf: dict[str, Any]) -> dict[str, bool]:
        return dict(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with RMSNorm on each query and key head before rotary (q_norm, k_norm)."""

    @staticmethod
    def arch_flags(hf: dict[str, Any]) -> dict[str, bool]:
        bias = bool(hf.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)
