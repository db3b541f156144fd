"""Peers measured by the same harness: `transformers` on the same prompts and device.

    hf-generate        one padded `model.generate` call over all prompts (static batching:
                       every row runs to the longest output)
    transformers       `model.generate_batch`, transformers' own continuous batching
                       (paged|sdpa attention)
Both generate greedily with EOS disabled, like `ignore_eos`, and count only the tokens each
prompt asked for.
"""

from __future__ import annotations

import time

import torch


def load_hf_model(model_dir: str, device: torch.device, dtype: torch.dtype,
                  attn_implementation: str | None = None, dummy: bool = False):
    """The transformers model for `model_dir`; `dummy`: random weights from config.json
    alone (like tandem's load_format="dummy"), initialised on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if dummy:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                                     dtype=dtype, **kw)
        model = model.eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kw)
        model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos
    return model


def run_hf_generate(model, prompts: list[list[int]], out_lens: list[int]) -> tuple[float, int]:
    """(elapsed seconds, useful output tokens) for one left-padded batch."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max(out_lens),
                             do_sample=False, pad_token_id=0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    assert out.shape[1] == width + max(out_lens)
    return elapsed, sum(out_lens)


def run_hf_generate_batch(model, prompts: list[list[int]], out_lens: list[int]
                          ) -> tuple[float, int]:
    """(elapsed seconds, output tokens) with transformers' continuous batching."""
    from transformers import GenerationConfig
    cfg = GenerationConfig(max_new_tokens=max(out_lens), do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    # No inference_mode here: generate_batch runs its loop in a worker thread, which must
    # not be handed inference tensors.
    results = model.generate_batch(inputs=prompts, generation_config=cfg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    tokens = sum(min(len(r.generated_tokens), o) for r, o in zip(results.values(), out_lens))
    if tokens == 0:
        raise RuntimeError("transformers generate_batch produced no tokens")
    return elapsed, tokens
