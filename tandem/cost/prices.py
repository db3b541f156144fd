"""Reference prices for `tandem cost`: inputs to override, not live quotes.

Every entry says where its number comes from and when. Prices move: pass your own with
--gpu-price and --api NAME=IN,CACHED,OUT (USD per million tokens). Entries marked
"assumption" are not a published price but a stated planning figure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GpuPrice:
    usd_per_gpu_hour: float
    source: str
    as_of: str


@dataclass(frozen=True, slots=True)
class ApiPrice:
    input_usd_per_m: float  # uncached input tokens
    cached_input_usd_per_m: float  # input tokens served from the provider's prompt cache
    output_usd_per_m: float
    source: str
    as_of: str


GPU_PRICES: dict[str, GpuPrice] = {
    "H100": GpuPrice(2.99, "Lambda Cloud on-demand list price, H100 SXM, per GPU", "2024-12"),
    "A100-80GB": GpuPrice(1.79, "Lambda Cloud on-demand list price, A100 SXM 80GB, per GPU",
                          "2024-12"),
    "H200": GpuPrice(3.50, "assumption: a planning figure in the range of on-demand H200 "
                           "offers by GPU clouds; pass --gpu-price with your quote", "2025"),
}

API_PRICES: dict[str, ApiPrice] = {
    "gpt-4o": ApiPrice(2.50, 1.25, 10.00, "OpenAI API pricing page", "2024-10"),
    "gpt-4o-mini": ApiPrice(0.15, 0.075, 0.60, "OpenAI API pricing page", "2024-10"),
    "claude-3.5-haiku": ApiPrice(0.80, 0.08, 4.00, "Anthropic API pricing page (cache reads)",
                                 "2024-11"),
    "llama-3.1-8b-hosted": ApiPrice(0.18, 0.18, 0.18, "Together AI serverless price for "
                                    "Meta-Llama-3.1-8B-Instruct-Turbo (no cache discount)",
                                    "2024-10"),
}
