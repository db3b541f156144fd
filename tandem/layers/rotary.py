"""Rotary position embedding (RoPE), neox/HF-Llama style: the head dim is split in halves.

    q' = q * cos(pos * f) + rotate_half(q) * sin(pos * f),  rotate_half(| a | b |) = | -b | a |

Frequencies f_i = theta^(-2i/D) may be rescaled for long context (`rope_scaling`):
"linear" divides all of them by `factor`; "llama3" (Llama 3.1) divides only the low
frequencies and interpolates smoothly between. cos/sin are cached in float32 for every
position up to max_position_embeddings and cast to the query dtype on use, like HF.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tandem.kernels import ops


def rope_parameters(hf_config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either config spelling.

    Older checkpoints write `rope_theta` + `rope_scaling`; transformers >= 5 writes one
    `rope_parameters` dict holding rope_theta and the scaling keys.
    """
    params = dict(hf_config.get("rope_parameters") or {})
    theta = float(hf_config.get("rope_theta") or params.pop("rope_theta", 10000.0))
    params.pop("rope_theta", None)
    scaling = hf_config.get("rope_scaling") or params or None
    return theta, scaling


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, after any long-context rescaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if scaling and float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, linear, llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep wavelengths < old_len/high_ff, divide those > old_len/low_ff by
    `factor`, blend linearly in 1/wavelength between the two."""
    factor = float(scaling["factor"])
    low_ff, high_ff = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low_ff, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high_ff) & (wavelen <= old_len / low_ff)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """forward(positions (T,), q (T, H, D), k (T, Hkv, D)) -> rotated (q, k)."""

    def __init__(self, head_dim: int, max_position_embeddings: int, theta: float = 10000.0,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = _inv_freq(head_dim, theta, scaling)
        # Computed on CPU so every device gets identical tables, then moved where the module is.
        positions = torch.arange(max_position_embeddings, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_freq.cpu())  # (max_pos, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_pos, D)
        device = torch.empty(0).device  # honours an enclosing `with torch.device(...)`
        self.register_buffer("cos_cache", emb.cos().to(device), persistent=False)
        self.register_buffer("sin_cache", emb.sin().to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rotary(positions, q, k, self.cos_cache, self.sin_cache)
