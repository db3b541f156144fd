"""CUDA graphs for decode steps: one captured model forward per batch size.

A decode step launches hundreds of small kernels; replaying a graph launches them with one
call. Graphs replay fixed addresses, so every input lives in a static buffer that each
step copies into, and a batch is padded up to the next captured size:

    rows      | real decodes (B) | padding up to the captured size (Bp) |
    slot        their cache slots  the dummy block's slots (never read by a real sequence)
    seq_len     their lengths      1 (attends to one dummy position)

Only backends whose decode path reads lengths and block tables from device tensors, with
launch sizes fixed by the batch size, can be captured (`supports_cuda_graphs`). A
speculative verify step is one too: each of its rows is a one-token query of its own
(runner/input_batch.py), so the graph of (rows) serves (batch, k + 1). Prefill chunks and
batches larger than the largest size run eagerly. Logits and sampling run
outside the graph.
"""

from __future__ import annotations

import torch

from tandem.layers.attention_metadata import AttentionMetadata
from tandem.runner.input_batch import ModelInputs

_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, max_batch: int, max_model_len: int,
                 block_size: int, dummy_block: int, device: torch.device) -> None:
        self.model = model
        # up to max_batch itself (a batch-1 speculative step is k + 1 rows exactly)
        self.sizes = [s for s in _SIZES if s < max_batch] + [min(max_batch, _SIZES[-1])]
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.dummy_block = dummy_block
        n = self.sizes[-1]
        width = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), dummy_block * block_size, dtype=torch.int64,
                                       device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, width), dummy_block, dtype=torch.int32,
                                       device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _meta(self, b: int) -> AttentionMetadata:
        # Host-side lengths are upper bounds: kernels size their launch from them only.
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b],
            query_lens_cpu=[1] * b, seq_lens_cpu=[self.max_model_len] * b, max_query_len=1,
            max_seq_len=self.max_model_len, block_size=self.block_size)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            meta = self._meta(b)
            for _ in range(2):  # warm up (autotuning, lazy init) outside the capture
                self.model(self.input_ids[:b], self.positions[:b], meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self.model(self.input_ids[:b], self.positions[:b], meta)
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def can_run(self, inputs: ModelInputs) -> bool:
        """One-token queries only (decodes, and the rows of verifying seqs), few enough."""
        meta = inputs.attn_metadata
        return 0 < meta.num_seqs <= self.sizes[-1] and meta.num_tokens == meta.num_seqs

    def run(self, inputs: ModelInputs) -> torch.Tensor:
        """hidden states (B, hidden) of a decode-only step, through the captured graph."""
        meta = inputs.attn_metadata
        b = meta.num_seqs
        padded = next(s for s in self.sizes if s >= b)
        width = meta.block_tables.shape[1]
        self.input_ids[:b].copy_(inputs.input_ids)
        self.positions[:b].copy_(inputs.positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.block_tables[:b, :width].copy_(meta.block_tables)
        if padded > b:  # padding rows: one dummy position each
            self.slot_mapping[b:padded].fill_(self.dummy_block * self.block_size)
            self.seq_lens[b:padded].fill_(1)
            self.block_tables[b:padded, 0].fill_(self.dummy_block)
        self.graphs[padded].replay()
        return self.outputs[padded][:b]
