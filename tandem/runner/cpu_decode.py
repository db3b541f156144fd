"""CPU decode steps in one native call: what CUDA graph replay is to a GPU step.

A decode step of a few rows on CPU is bound by reading the weights once (89 MB for the
embedded model), one of many rows by the matmuls' arithmetic; through the model's PyTorch
forward its ~70 ops each pay a Python call, a dispatch and an OpenMP fork/join besides.
`CpuDecodeRunner` runs the same math (embedding, every decoder layer, final norm, LM head)
as one call into `kernels/cpu/decode_step.c`, one OpenMP region for the whole step, on the
linears' packed panels (layers/cpu_gemm.py: the copy the forward's linears use too) and
the KV cache tensors, read in place. Before it takes their pointers, the panels move once
into a mapping backed by 2 MB pages where the system grants them (`_move_to_huge_pages`:
same values; streaming 89 MB then needs ~45 TLB entries, not ~22,000, which measured ~4%
off the step's best and median times on the 2-core box).

    model_runner.launch:  plain decodes (<= MAX_ROWS, one known token each), all plain
                          greedy -> CpuDecodeRunner.greedy(plan)   token ids (a list)
                          step of <= MAX_ROWS one-token queries, every row sampled
                          (plain decodes, or speculative decoding's verify rows)
                          -> CpuDecodeRunner.logits(inputs)       (rows, vocab)
                          else model.forward -> compute_logits     (the spec)

Plain decode rows are written into standing input buffers (`decode_inputs`) rather than
built: each step changes only a row's id, position, slot and length. The greedy shortcut
also takes each row's argmax inside the native call and returns Python ints: no torch op
and no tensor between two steps. That matters more than the op counts suggest: the step
streams ~89 MB through the caches, so whatever host code runs between two steps runs
cold (a torch op that takes 10 us in a loop takes 25-60 us there).

It is built for what it covers and is None otherwise: a float32 Llama/Mistral-style model
(no biases, no q/k norm, plain decoder layers) on one CPU rank, unquantized, float32 KV
cache, and the C kernels available. `enforce_eager=True` or `TANDEM_CPU_KERNELS=0` turns
it off; the model's forward is the reference it is tested against
(tests/unit/test_cpu_decode.py).
"""

from __future__ import annotations

import ctypes
import logging
import mmap

import torch
from torch import nn

from tandem.layers.attention_metadata import AttentionMetadata
from tandem.outputs import StepPlan
from tandem.runner.input_batch import ModelInputs
from tandem.runner.request_state import RequestState

logger = logging.getLogger(__name__)

MAX_ROWS = 256  # rows of the standing inputs; larger steps take the forward

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
    from tandem.layers.linear_method import CpuPackedLinearMethod
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
    if not all(type(m.method) is CpuPackedLinearMethod and _plain_f32(m.weight)
               for m in linears):
        return "quantized or not float32"
    if not all(getattr(m, "packed", None) is not None and m.packed.kind == "panels"
               for m in linears):
        return "no packed panels"
    if any(l.mlp.gate_up_proj.packed.nseg != 2 for l in layers):
        return "gate/up halves of unequal size"
    for layer in layers:
        attn = layer.self_attn.attn
        if not _plain_f32(attn.kv_cache) or attn.fp8_attention:
            return "the KV cache is not float32"
    return None


def _move_to_huge_pages(weights: list) -> mmap.mmap | None:
    """Move the packed weights' tensors (cpu_gemm.PackedWeight) into one anonymous mapping
    that asks for transparent huge pages (granted under THP "madvise" or "always"), each
    at a 64-byte aligned offset, values and shapes unchanged; the PyTorch forward's
    linears read the same tensors. Returns the mapping, which must outlive the tensors'
    use; None where it cannot be had (the tensors stay where they are)."""
    sizes = [-(-w.tensor.numel() * 4 // 64) * 64 for w in weights]
    huge = 2 << 20
    length = -(-sum(sizes) // huge) * huge + huge  # and room to start on a 2 MB boundary
    try:
        arena = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, AttributeError, ValueError) as e:  # no THP advice on this system
        logger.info("CPU decode weights stay in 4 KB pages (%s)", e)
        return None
    raw = torch.frombuffer(arena, dtype=torch.uint8)
    offset = -raw.data_ptr() % huge
    for w, size in zip(weights, sizes):
        t = w.tensor
        view = raw[offset:offset + t.numel() * 4].view(torch.float32).view(t.shape)
        view.copy_(t)
        w.tensor = view
        offset += size
    return arena


class CpuDecodeRunner:
    """Steps of 1..MAX_ROWS one-token query rows through `tandem_llama_decode_f32`."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL) -> None:
        self._fn = lib.tandem_llama_decode_f32
        layers = model.model.layers
        linears = [m for l in layers for m in (l.self_attn.qkv_proj, l.self_attn.o_proj,
                                                l.mlp.gate_up_proj, l.mlp.down_proj)]
        self._arena = _move_to_huge_pages(  # before any pointer is taken
            [m.packed for m in [*linears, model.lm_head]])
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
            lm_head=model.lm_head.packed.tensor.data_ptr(),
            cos_cache=self._keep[0].data_ptr(), sin_cache=self._keep[1].data_ptr(),
            input_norm=ptrs([l.input_layernorm.weight for l in layers]),
            qkv=ptrs([l.self_attn.qkv_proj.packed.tensor for l in layers]),
            o_proj=ptrs([l.self_attn.o_proj.packed.tensor for l in layers]),
            post_norm=ptrs([l.post_attention_layernorm.weight for l in layers]),
            gate_up=ptrs([l.mlp.gate_up_proj.packed.tensor for l in layers]),
            down=ptrs([l.mlp.down_proj.packed.tensor for l in layers]),
            k_cache=ptrs([c[0] for c in caches]), v_cache=ptrs([c[1] for c in caches]))
        self._model_ref = ctypes.byref(self._model)
        self._block_size = self._model.block_size
        self._alloc_inputs(64)
        # greedy(): the logits it writes (and nobody reads) and the argmax it returns
        self.vocab_size = model.vocab_size  # argmax over these; lm_head rows may be padded
        self._logits_buf = torch.empty(8, self.vocab_rows)  # grown to the rows a step has
        self._argmax = (ctypes.c_int64 * MAX_ROWS)()
        self._argmax_ptr = ctypes.addressof(self._argmax)
        eps = {n.eps for l in layers for n in (l.input_layernorm, l.post_attention_layernorm)}
        if eps != {model.model.norm.eps}:
            raise ValueError("layers with different RMSNorm eps")

    def _alloc_inputs(self, width: int) -> None:
        """The standing inputs of plain decode steps (`decode_inputs`, `greedy`), block
        tables `width` blocks wide:

            longs   (3, MAX_ROWS) int64        | input ids | positions | slots |
            lens    (MAX_ROWS,) int32          seq_lens
            tables  (MAX_ROWS, width) int32    row r: row r's block table, padded with 0

        written through ctypes arrays over the same memory: a store costs ~0.1 us where a
        tensor element assignment costs several, and the greedy step makes no tensor."""
        self._width = width
        self._longs = torch.zeros(3, MAX_ROWS, dtype=torch.int64)
        self._lens = torch.zeros(MAX_ROWS, dtype=torch.int32)
        self._tables = torch.zeros(MAX_ROWS, width, dtype=torch.int32)
        self._longs_c = (ctypes.c_int64 * (3 * MAX_ROWS)).from_address(self._longs.data_ptr())
        self._lens_c = (ctypes.c_int32 * MAX_ROWS).from_address(self._lens.data_ptr())
        self._tables_c = (ctypes.c_int32 * (MAX_ROWS * width)).from_address(
            self._tables.data_ptr())
        # the step's pointer arguments after rows: ids, positions, slots, tables, stride, lens
        ptr, row = self._longs.data_ptr(), MAX_ROWS * 8
        self._input_args = (ptr, ptr + row, ptr + 2 * row, self._tables.data_ptr(), width,
                            self._lens.data_ptr())
        # what each block-table row holds: (request state, its blocks_version, blocks written)
        self._row_tables: list[tuple[RequestState | None, int, int]] = [(None, 0, 0)] * MAX_ROWS
        self._views: dict[int, tuple] = {}  # per row count: the tensors decode_inputs passes

    def _write_rows(self, plan: StepPlan, states: dict[str, RequestState],
                    greedy: bool) -> list[int] | None:
        """Write a plan of 1..MAX_ROWS plain decode rows (one known input token each,
        sampled, no drafts) into the standing inputs; per row only the id, position, slot
        and length change, and the block-table row when the request's table did
        (`RequestState.blocks_version`). Returns the rows' seq_lens, or None (nothing
        written) for any other plan, or with `greedy` when a row does not sample by argmax
        alone (Sampler's plain greedy case: no logprobs, penalties or min_tokens ban)."""
        seqs = plan.seqs
        if not 0 < len(seqs) <= MAX_ROWS:
            return None
        for seq in seqs:
            if (seq.num_new_tokens != 1 or not seq.sample or seq.inflight_input
                    or seq.spec_token_ids):
                return None
            if greedy and not states[seq.request_id].greedy_at(seq.end_pos):
                return None
        bs = self._block_size
        longs, lens, row_tables = self._longs_c, self._lens_c, self._row_tables
        seq_lens: list[int] = []
        for r, seq in enumerate(seqs):
            st = states[seq.request_id]
            pos = seq.start_pos
            blocks = st.block_ids
            longs[r] = st.token_ids[pos]
            longs[MAX_ROWS + r] = pos
            longs[2 * MAX_ROWS + r] = blocks[pos // bs] * bs + pos % bs
            lens[r] = pos + 1
            seq_lens.append(pos + 1)
            held, version, written = row_tables[r]
            if held is not st or version != st.blocks_version:
                n = len(blocks)
                if n > self._width:  # a wider table: every row is written again
                    self._alloc_inputs(max(n, 2 * self._width))
                    return self._write_rows(plan, states, greedy)
                base = r * self._width
                self._tables_c[base:base + n] = blocks
                if written > n:
                    self._tables_c[base + n:base + written] = [0] * (written - n)
                row_tables[r] = (st, st.blocks_version, n)
        return seq_lens

    def decode_inputs(self, plan: StepPlan, states: dict[str, RequestState]
                      ) -> ModelInputs | None:
        """What `build_model_inputs` builds for a plan of plain decode rows (see
        `_write_rows`), as views of the standing inputs: read by this step only, the next
        one overwrites them. None for any other plan."""
        seq_lens = self._write_rows(plan, states, greedy=False)
        if seq_lens is None:
            return None
        rows = len(seq_lens)
        views = self._views.get(rows)
        if views is None:
            ar = torch.arange(rows + 1, dtype=torch.int32)
            views = self._views[rows] = (
                self._longs[0, :rows], self._longs[1, :rows], self._longs[2, :rows],
                ar, self._lens[:rows], self._tables[:rows], ar[:rows].long())
        ids, positions, slots, query_start, lens, tables, logits_rows = views
        ones = [1] * rows  # query lengths, and logits rows per sampling seq
        meta = AttentionMetadata(slots, query_start, lens, tables, ones, seq_lens, 1,
                                 max(seq_lens), self._block_size)
        return ModelInputs(ids, positions, meta, list(range(rows)), logits_rows, [],
                           sample_counts=ones)

    def greedy(self, plan: StepPlan, states: dict[str, RequestState]) -> list[int] | None:
        """The tokens of a step of plain decode rows that all sample greedily without
        logprobs (see `_write_rows`): the step and each row's argmax (torch.argmax's
        rule) in one native call, with no torch op and no tensor made on the way. None,
        having done nothing, for any other plan: then `decode_inputs` or the general
        builder, `logits` and the Sampler, which pick the same tokens
        (tests/unit/test_cpu_decode.py)."""
        seq_lens = self._write_rows(plan, states, greedy=True)
        if seq_lens is None:
            return None
        rows = len(seq_lens)
        if rows > self._logits_buf.shape[0]:  # (rows, vocab) of a big vocabulary is MBs
            self._logits_buf = torch.empty(min(MAX_ROWS, 2 * rows), self.vocab_rows)
        rc = self._fn(self._model_ref, rows, *self._input_args, self._logits_buf.data_ptr(),
                      torch.get_num_threads(), self.vocab_size, self._argmax_ptr)
        if rc != 0:
            raise RuntimeError("tandem_llama_decode_f32 refused the step")
        return self._argmax[:rows]

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
                      out.data_ptr(), torch.get_num_threads(), 0, None)
        if rc != 0:
            raise RuntimeError("tandem_llama_decode_f32 refused the step")
        return out
