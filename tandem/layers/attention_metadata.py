"""`AttentionMetadata`: what every attention layer needs to know about one step's batch.

Built once per step by the model runner and passed explicitly down `model.forward`. The new
tokens of all sequences are flattened into one row dimension:

    tokens      | seq0 (chunk of 5) | seq1 (1) | seq2 (1) |
    query_start   0                   5          6          7
    seq_lens      start_pos + 5       ctx1 + 1   ctx2 + 1        (K/V length after this step)

A token's K/V goes to `slot = block_table[pos // block_size] * block_size + pos % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,) int64: cache slot of each new token's K/V
    query_start_loc: torch.Tensor  # (num_seqs + 1,) int32: row offsets of each seq's tokens
    seq_lens: torch.Tensor  # (num_seqs,) int32: K/V length of each seq after this step
    block_tables: torch.Tensor  # (num_seqs, max_blocks) int32, padded with 0
    query_lens_cpu: list[int]  # host copies of the above, for loops and launch sizes
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Rows past the last sequence's device query_start_loc are padding (a CUDA graph of a
    # larger token count): attention leaves zeros there, so every later op sees finite rows
    pad_rows: bool = False
    # Every row is a sequence of its own (not a speculative verify step's rows of one
    # sequence): a decode-only step may then write each row's K/V inside its attention
    # launch (backend.rotary_decode), since no row reads another's new K/V
    decode_rows_distinct: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
