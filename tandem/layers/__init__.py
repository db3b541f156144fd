"""Layers: the building blocks models are written in, each owning its weight loader.

    embedding.py  VocabEmbedding, LMHead (optionally tied to the embedding)
    linear.py     Linear, ColumnLinear, RowLinear, QKVLinear, MergedColumnLinear
    norm.py       RMSNorm (with fused residual add)
    rotary.py     RotaryEmbedding (default / linear / llama3 scaling)
    activation.py SiluAndMul
    attention.py  Attention: write_kv + paged attention through a `tandem.kernels` backend
    attention_metadata.py  AttentionMetadata, built by the model runner once per step

Data flow in one decoder layer: hidden (T, hidden) -> RMSNorm -> QKVLinear -> rotary ->
Attention (cache write, paged attention; reads AttentionMetadata) -> RowLinear -> residual.
Parallelism and quantization, when they come, enter through these classes' constructors
and weight loaders; the models do not change. This package imports nothing at import time
so `tandem.kernels` can import `attention_metadata` without a cycle.
"""
