"""CUDA graphs: one captured model forward per decode batch size, and per prefill size.

A decode step launches hundreds of small kernels; replaying a graph launches them with one
call. Graphs replay fixed addresses, so every input lives in a static buffer that each
step copies into, and a batch is padded up to the next captured size:

    rows      | real decodes (B) | padding up to the captured size (Bp) |
    slot        their cache slots  the dummy block's slots (never read by a real sequence)
    seq_len     their lengths      1 (attends to one dummy position)

Only backends whose decode path reads lengths and block tables from device tensors, with
launch sizes fixed by the batch size, can be captured (`supports_cuda_graphs`). A
speculative verify step is one too: each of its rows is a one-token query of its own
(runner/input_batch.py), so the graph of (rows) serves (batch, k + 1).

A prefill step of one sequence (one chunk of q >= 2 tokens, with or without a cached
prefix) replays the graph of the next prefill size Q >= q. Eagerly such a step is bound by
the host, not the GPU (~440 Triton launches, 144 cuBLAS calls and the layer code for a
128-token Qwen3-30B-A3B prefill: 50 ms of wall time, 8 ms of GPU time; docs/moe.md):

    rows      | the chunk's q tokens            | padding up to Q           |
    slot        their cache slots                 the dummy block's slots
    attention   causal over the cached prefix     zeros (AttentionMetadata.pad_rows), so the
                and the chunk (device lengths)    MLP and MoE routing see finite rows

The prefill kernel reads the chunk's length and context from device tensors and its grid
covers Q rows, so one graph serves any q <= Q and any prefix. Batches of several sequences
(prefill or mixed) and larger chunks run eagerly. Logits and sampling run outside the graph.
"""

from __future__ import annotations

import torch

from tandem.layers.attention_metadata import AttentionMetadata
from tandem.runner.input_batch import ModelInputs

_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]
PREFILL_SIZES = [16, 32, 64, 128, 256, 512]


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, max_batch: int, max_model_len: int,
                 block_size: int, dummy_block: int, device: torch.device,
                 max_prefill_tokens: int = 0, verify_rows: bool = False) -> None:
        """max_prefill_tokens: the longest one-sequence prefill chunk to capture (0: none);
        sizes up to it from PREFILL_SIZES, the last one at least its size. verify_rows: the
        decode graphs also replay speculative verify steps (rows of one sequence), so
        attention must not write a row's K/V inside its own launch
        (AttentionMetadata.decode_rows_distinct)."""
        self.model = model
        self.verify_rows = verify_rows
        # up to max_batch itself (a batch-1 speculative step is k + 1 rows exactly)
        self.sizes = [s for s in _SIZES if s < max_batch] + [min(max_batch, _SIZES[-1])]
        cap = min(max_prefill_tokens, max_model_len, PREFILL_SIZES[-1])
        self.prefill_sizes = [s for s in PREFILL_SIZES if s < cap] + ([cap] if cap >= 2 else [])
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.dummy_block = dummy_block
        n = max(self.sizes[-1], max(self.prefill_sizes, default=0))
        width = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), dummy_block * block_size, dtype=torch.int64,
                                       device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.chunk_start_loc = torch.zeros(2, dtype=torch.int32, device=device)  # prefill
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, width), dummy_block, dtype=torch.int32,
                                       device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_outputs: dict[int, torch.Tensor] = {}

    def _meta(self, b: int) -> AttentionMetadata:
        # Host-side lengths are upper bounds: kernels size their launch from them only.
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b],
            query_lens_cpu=[1] * b, seq_lens_cpu=[self.max_model_len] * b, max_query_len=1,
            max_seq_len=self.max_model_len, block_size=self.block_size,
            decode_rows_distinct=not self.verify_rows)

    def _prefill_meta(self, q: int) -> AttentionMetadata:
        # One chunk of up to q rows; a seq_len unlike q keeps the kernel on the paged path
        # (a prefix may be cached), and the rows past the chunk are padding.
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:q], query_start_loc=self.chunk_start_loc,
            seq_lens=self.seq_lens[:1], block_tables=self.block_tables[:1],
            query_lens_cpu=[q], seq_lens_cpu=[self.max_model_len], max_query_len=q,
            max_seq_len=self.max_model_len, block_size=self.block_size, pad_rows=True)

    def _capture(self, rows: int, meta: AttentionMetadata, pool) -> tuple:
        for _ in range(2):  # warm up (autotuning, lazy init) outside the capture
            self.model(self.input_ids[:rows], self.positions[:rows], meta)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self.model(self.input_ids[:rows], self.positions[:rows], meta)
        return graph, out

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self.graphs[b], self.outputs[b] = self._capture(b, self._meta(b), pool)
        for q in reversed(self.prefill_sizes):
            self.chunk_start_loc.copy_(torch.tensor([0, q], dtype=torch.int32))
            self.seq_lens[:1].fill_(q)  # the dummy block: positions wrap in one block
            self.prefill_graphs[q], self.prefill_outputs[q] = self._capture(
                q, self._prefill_meta(q), pool)
        self.seq_lens.fill_(1)
        torch.cuda.synchronize()

    def can_run(self, inputs: ModelInputs) -> bool:
        """One-token queries only (decodes, and the rows of verifying seqs), few enough; or
        one sequence's prefill chunk no longer than the largest prefill graph."""
        meta = inputs.attn_metadata
        if meta.num_tokens == meta.num_seqs:
            return 0 < meta.num_seqs <= self.sizes[-1]
        return (meta.num_seqs == 1 and bool(self.prefill_sizes)
                and 2 <= meta.num_tokens <= self.prefill_sizes[-1])

    def run(self, inputs: ModelInputs) -> torch.Tensor:
        """hidden states (rows, hidden) of the step, through a captured graph."""
        meta = inputs.attn_metadata
        if meta.num_tokens != meta.num_seqs:
            return self._run_prefill(inputs)
        b = meta.num_seqs
        padded = next(s for s in self.sizes if s >= b)
        self._load(inputs, b, padded)
        if padded > b:  # padding rows: one dummy position each
            self.seq_lens[b:padded].fill_(1)
            self.block_tables[b:padded, 0].fill_(self.dummy_block)
        self.graphs[padded].replay()
        return self.outputs[padded][:b]

    def _run_prefill(self, inputs: ModelInputs) -> torch.Tensor:
        meta = inputs.attn_metadata
        q = meta.num_tokens
        padded = next(s for s in self.prefill_sizes if s >= q)
        self._load(inputs, q, padded)
        if padded > q:  # padding rows: token 0 at position 0 (their K/V: the dummy block)
            self.input_ids[q:padded].zero_()
            self.positions[q:padded].zero_()
        self.chunk_start_loc.copy_(meta.query_start_loc)
        self.prefill_graphs[padded].replay()
        return self.prefill_outputs[padded][:q]

    def _load(self, inputs: ModelInputs, rows: int, padded: int) -> None:
        """The step's tokens (rows of them) and its sequences' lengths and block tables into
        the static buffers; padding rows' K/V go to the dummy block."""
        meta = inputs.attn_metadata
        seqs, width = meta.block_tables.shape
        self.input_ids[:rows].copy_(inputs.input_ids)
        self.positions[:rows].copy_(inputs.positions)
        self.slot_mapping[:rows].copy_(meta.slot_mapping)
        self.seq_lens[:seqs].copy_(meta.seq_lens)
        self.block_tables[:seqs, :width].copy_(meta.block_tables)
        if padded > rows:
            self.slot_mapping[rows:padded].fill_(self.dummy_block * self.block_size)
