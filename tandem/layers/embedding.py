"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.layers import cpu_gemm

from tandem.layers.linear import default_weight_loader


class VocabEmbedding(nn.Module):
    """input_ids (T,) -> (T, embedding_dim) (vLLM's VocabParallelEmbedding, one rank)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden (N, embedding_dim) -> logits (N, num_embeddings).

    Tied (`tie_to(embedding)`): the head holds the embedding's Parameter itself, so it is
    loaded once and `named_parameters()` lists it once, under the embedding's name.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

        self.packed: torch.Tensor | None = None  # oneDNN copy of weight on CPU (cpu_gemm.py)

    def tie_to(self, embedding: VocabEmbedding) -> None:
        self.weight = embedding.weight

    def process_weights_after_loading(self) -> None:
        self.packed = cpu_gemm.pack_weight(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return cpu_gemm.linear(hidden, self.weight, self.packed)
