"""Token embedding and the LM head, split over the vocabulary under tensor parallelism.

    rank r holds vocab rows [r*V', (r+1)*V'), V' = ceil(vocab / tp); rows past the vocab
    (the last rank's padding) are zero and never looked up or sampled

    VocabParallelEmbedding  ids outside the rank's range read zeros; one all-reduce
                            assembles every token's row
    ParallelLMHead          hidden -> this rank's logits (N, V'); an all-gather makes the
                            whole (N, vocab) on every rank, so all ranks sample alike

The head may share the embedding's weight (tied): both shard it the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.distributed.parallel import ParallelContext
from tandem.layers.linear import copy_checked
from tandem.layers.linear_method import LinearMethod, linear_method_for
from tandem.quantization.policy import QuantPolicy


class VocabParallelEmbedding(nn.Module):
    """input_ids (T,) -> (T, embedding_dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, prefix: str = "",
                 parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.prefix = prefix
        self.parallel = parallel = parallel or ParallelContext.single()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_per_rank = -(-num_embeddings // parallel.tp_size)  # V'
        self.vocab_start = parallel.tp_rank * self.num_per_rank
        self.vocab_end = min(num_embeddings, self.vocab_start + self.num_per_rank)
        self.weight = nn.Parameter(torch.empty(self.num_per_rank, embedding_dim),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if tuple(loaded.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"shape mismatch: expected {(self.num_embeddings, self.embedding_dim)}"
                             f", got {tuple(loaded.shape)}")
        n = self.vocab_end - self.vocab_start
        copy_checked(param.data[:n], loaded[self.vocab_start:self.vocab_end])
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(mine, input_ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.parallel.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden (N, embedding_dim) -> logits (N, num_embeddings), whole on every rank.

    Tied (`tie_to(embedding)`): the head holds the embedding's Parameter itself, so it is
    loaded once and `named_parameters()` lists it once, under the embedding's name.
    A method that names its own checkpoint tensors (a compressed-tensors head:
    lm_head.weight_packed, .weight_scale, ...) creates them instead of `weight`; each is
    cut by vocabulary rows like the weight, and such a head cannot be tied.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, prefix: str = "",
                 parallel: ParallelContext | None = None,
                 quant: QuantPolicy | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, prefix, parallel)
        self.method = linear_method_for(prefix, quant)
        self.checkpoint_tensors = (type(self.method).create_weights
                                   is not LinearMethod.create_weights)
        if self.checkpoint_tensors:
            del self.weight
            self.method.create_weights(self, self.num_per_rank, embedding_dim)
            for param in self.parameters(recurse=False):
                param.weight_loader = self.rows_loader

    def rows_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """A checkpoint tensor with a row per vocabulary entry: this rank's rows, the
        padding rows past the vocabulary zero."""
        if loaded.shape[0] != self.num_embeddings or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(f"shape mismatch: expected ({self.num_embeddings}, "
                             f"{', '.join(map(str, param.shape[1:]))}), got "
                             f"{tuple(loaded.shape)}")
        n = self.vocab_end - self.vocab_start
        copy_checked(param.data[:n], loaded[self.vocab_start:self.vocab_end])
        param.data[n:].zero_()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        if self.checkpoint_tensors:
            raise ValueError(f"{self.prefix}: a quantized LM head ({self.method.name}) "
                             f"cannot share the embedding's weight; the checkpoint's "
                             f"config must set tie_word_embeddings false")
        self.weight = embedding.weight

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.method.apply(self, hidden)  # (N, V')
        if self.parallel.tp_size == 1:
            return logits
        return self.parallel.all_gather(logits, dim=-1)[:, :self.num_embeddings]
