"""CPU decode steps in one native call: what CUDA graph replay is to a GPU step.

A decode step of a few rows on CPU is bound by reading the weights once (85 MB for the
embedded model, ~3.4 ms at this machine's ~26 GB/s), but through the model's PyTorch
forward its ~70 ops each pay a Python call, a dispatch and an OpenMP fork/join: 8-10 ms a
token on the 2-core development machine. `CpuDecodeRunner` runs the same math
(embedding, every decoder layer, final norm, LM head) as one call into
`kernels/cpu/decode_step.c`, on the model's own weight and KV cache tensors (read in
place; nothing is copied or rewritten), one OpenMP region for the whole step.

    model_runner.launch:  step of <= MAX_ROWS one-token queries, every row sampled
                          (plain decodes, or speculative decoding's verify rows)
                          -> CpuDecodeRunner.logits(inputs)       (rows, vocab)
                          else model.forward -> compute_logits     (the spec)

It is built for what it covers and is None otherwise: a float32 Llama/Mistral-style model
(no biases, no q/k norm, plain decoder layers) on one CPU rank, unquantized, float32 KV
cache, and the C kernels available. `enforce_eager=True` or `TANDEM_CPU_KERNELS=0` turns
it off; the model's forward is the reference it is tested against
(tests/unit/test_cpu_decode.py).
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from tandem.runner.input_batch import ModelInputs

logger = logging.getLogger(__name__)

MAX_ROWS = 8  # as TANDEM_DECODE_MAX_ROWS in decode_step.c; larger steps batch well in oneDNN

_P = ctypes.c_void_p


class _LlamaF32(ctypes.Structure):
    """`tandem_llama_f32` of decode_step.c: dimensions and weight pointers."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
        "intermediate_size", "vocab_size", "block_size")] + [
        ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float)] + [
        (name, _P) for name in ("embed", "final_norm", "lm_head", "cos_cache", "sin_cache",
                                "input_norm", "qkv", "o_proj", "post_norm", "gate_up", "down",
                                "k_cache", "v_cache")]


def _plain_f32(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _unsupported(model: nn.Module) -> str | None:
    """Why the fused step cannot run this model (None: it can)."""
    from tandem.layers.linear_method import OneDNNLinearMethod, UnquantizedLinearMethod
    from tandem.models.llama import LlamaDecoderLayer
    args = getattr(model, "args", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if args is None or layers is None or not all(type(l) is LlamaDecoderLayer for l in layers):
        return "not a plain Llama-family model"
    if args.qkv_bias or args.o_bias or args.mlp_bias or args.qk_norm:
        return "biases or q/k norms"
    if model.model.embed_tokens.parallel.tp_size != 1:
        return "tensor parallelism"
    linears = [m for layer in layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                               layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    linears.append(model.lm_head)
    if not all(type(m.method) in (OneDNNLinearMethod, UnquantizedLinearMethod)
               and _plain_f32(m.weight) for m in linears):
        return "quantized or not float32"
    for layer in layers:
        attn = layer.self_attn.attn
        if not _plain_f32(attn.kv_cache) or attn.fp8_attention:
            return "the KV cache is not float32"
    return None


class CpuDecodeRunner:
    """Steps of 1..MAX_ROWS one-token query rows through `tandem_llama_decode_f32`."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL) -> None:
        self._fn = lib.tandem_llama_decode_f32
        layers = model.model.layers
        attn0, rotary = layers[0].self_attn.attn, layers[0].self_attn.rotary_emb
        args = model.args
        self.vocab_rows = model.lm_head.weight.shape[0]  # >= vocab_size (padded shards)
        # The pointer arrays and tensors the struct points into must outlive it.
        self._keep: list = [rotary.cos_cache.contiguous(), rotary.sin_cache.contiguous()]

        def ptrs(tensors: list[torch.Tensor]) -> ctypes.Array:
            arr = (_P * len(tensors))(*(t.data_ptr() for t in tensors))
            self._keep.append(arr)
            return ctypes.addressof(arr)

        caches = [layer.self_attn.attn.kv_cache for layer in layers]
        self._model = _LlamaF32(
            num_layers=len(layers), hidden_size=args.hidden_size,
            num_heads=attn0.num_heads, num_kv_heads=attn0.num_kv_heads,
            head_dim=attn0.head_dim, intermediate_size=args.intermediate_size,
            vocab_size=self.vocab_rows, block_size=caches[0].shape[2],
            eps=layers[0].input_layernorm.eps, attn_scale=attn0.scale,
            embed=model.model.embed_tokens.weight.data_ptr(),
            final_norm=model.model.norm.weight.data_ptr(),
            lm_head=model.lm_head.weight.data_ptr(),
            cos_cache=self._keep[0].data_ptr(), sin_cache=self._keep[1].data_ptr(),
            input_norm=ptrs([l.input_layernorm.weight for l in layers]),
            qkv=ptrs([l.self_attn.qkv_proj.weight for l in layers]),
            o_proj=ptrs([l.self_attn.o_proj.weight for l in layers]),
            post_norm=ptrs([l.post_attention_layernorm.weight for l in layers]),
            gate_up=ptrs([l.mlp.gate_up_proj.weight for l in layers]),
            down=ptrs([l.mlp.down_proj.weight for l in layers]),
            k_cache=ptrs([c[0] for c in caches]), v_cache=ptrs([c[1] for c in caches]))
        self._model_ref = ctypes.byref(self._model)
        eps = {n.eps for l in layers for n in (l.input_layernorm, l.post_attention_layernorm)}
        if eps != {model.model.norm.eps}:
            raise ValueError("layers with different RMSNorm eps")

    @staticmethod
    def create(model: nn.Module) -> CpuDecodeRunner | None:
        """The fused step for `model` (weights loaded, KV caches bound), or None where it
        does not apply (logged)."""
        from tandem import envs
        from tandem.kernels.cpu import load_library
        why = _unsupported(model) if envs.cpu_kernels_enabled() else "TANDEM_CPU_KERNELS=0"
        lib = load_library() if why is None else None
        if why is None and lib is None:
            why = "the C kernels are unavailable"
        if why is not None:
            logger.info("CPU decode steps run the PyTorch forward (%s)", why)
            return None
        return CpuDecodeRunner(model, lib)

    def can_run(self, inputs: ModelInputs) -> bool:
        """At most MAX_ROWS one-token queries (decodes, verify rows), every row a logits
        row in row order (every row samples: no prompt logprobs, no prefill chunk)."""
        meta = inputs.attn_metadata
        rows = meta.num_tokens
        return (0 < rows <= MAX_ROWS and meta.max_query_len == 1 and meta.num_seqs == rows
                and inputs.logits_indices.shape[0] == rows and not inputs.prompt_lp_spans)

    def logits(self, inputs: ModelInputs) -> torch.Tensor:
        """The step's forward and LM head: (rows, vocab rows) float32 logits; the new K/V
        are written into the caches as the model's forward would."""
        meta = inputs.attn_metadata
        rows = meta.num_tokens
        out = torch.empty(rows, self.vocab_rows)
        tables = meta.block_tables
        rc = self._fn(self._model_ref, rows, inputs.input_ids.data_ptr(),
                      inputs.positions.data_ptr(), meta.slot_mapping.data_ptr(),
                      tables.data_ptr(), tables.stride(0), meta.seq_lens.data_ptr(),
                      out.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError("tandem_llama_decode_f32 refused the step")
        return out
