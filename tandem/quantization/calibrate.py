"""`tandem quant gptq`: INT4 weights calibrated with GPTQ on a few text files, written as a
compressed-tensors pack-quantized checkpoint (the format llm-compressor writes), which
tandem (and vLLM) then load without flags:

    tandem quant gptq --model DIR --out OUT calib/*.py [--lm-head] [--asymmetric]
    tandem eval --model OUT held_out/

Calibration runs tandem's own model (float32, the reference kernels on CPU, or --device
cuda) over token windows of the files, one linear group at a time and in model order, so
each group sees the outputs of the groups already quantized before it (GPTQ's "true
sequential" order):

    layer i:  qkv_proj  ->  o_proj  ->  gate_up_proj  ->  down_proj      then lm_head
              (H = sum x x^T of the group's input over all windows; a forward stops at
               the group, so layer i costs a pass over layers 0..i)

A fused group (qkv, gate/up) is one GPTQ problem: rows are independent, so the result is
the same as quantizing q, k and v apart, and the rows are split back into the checkpoint's
q_proj / k_proj / v_proj (gate_proj / up_proj) tensors when written. Scales are rounded to
the checkpoint's dtype before the codes are chosen, so the stored scales dequantize
exactly. Dense models only (a mixture of experts' expert weights are not linears here).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch

from tandem.kernels.reference import quant
from tandem.quantization.gptq import gptq_int4

GROUPS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
# checkpoint tensor -> (fused module, its position among the fused rows)
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _Stop(Exception):
    """Raised by a hook once the group's input is recorded: the rest of the pass is moot."""


def calibration_windows(model_dir: str, files: list[str], window: int, max_tokens: int
                        ) -> list[list[int]]:
    """The files' tokens, each file after an end-of-text token, cut into windows of
    `window` tokens (the last shorter), max_tokens in all."""
    from tandem.engine.tokenizer import Tokenizer
    tok = Tokenizer(model_dir)
    sep = min(tok.eos_token_ids) if tok.eos_token_ids else 0
    stream: list[int] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            stream += [sep] + tok.encode(f.read(), add_special_tokens=False)
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    return [stream[i:i + window] for i in range(0, len(stream), window)]


def _forward(model, windows: list[list[int]]) -> None:
    """One prefill of several windows as separate sequences, through the model's own paged
    attention on a scratch KV cache (float32); a hook ends it early (_Stop)."""
    from tandem.quantization.sensitivity import scratch_prefill
    meta = scratch_prefill(model, [len(w) for w in windows])
    device = meta.seq_lens.device
    ids = torch.cat([torch.tensor(w) for w in windows]).to(device)
    positions = torch.cat([torch.arange(len(w)) for w in windows]).to(device)
    with torch.inference_mode():
        model.compute_logits(model(ids, positions, meta))


def _input_hessian(model, module, windows: list[list[int]], batch: int) -> torch.Tensor:
    """sum over the windows' tokens of x x^T, x the input of `module` (float32)."""
    acc: list[torch.Tensor] = []

    def hook(_mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if not acc:
            acc.append(torch.zeros(x.shape[1], x.shape[1], device=x.device))
        acc[0].addmm_(x.t(), x)
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for i in range(0, len(windows), batch):
            try:
                _forward(model, windows[i:i + batch])
            except _Stop:
                pass
    finally:
        handle.remove()
    if not acc:
        raise RuntimeError(f"calibration never reached {module.prefix}")
    return acc[0]


def _set_weight(module, w: torch.Tensor) -> None:
    """Give a linear its dequantized weight, re-running its method's post-load step (the
    CPU method keeps a packed copy of the weight)."""
    module.weight.data.copy_(w.to(module.weight.dtype))
    module.method.process_weights_after_loading(module)


def calibrate(model_dir: str, windows: list[list[int]], group_size: int = 128,
              symmetric: bool = True, lm_head: bool = False, damp: float = 0.01,
              device: str = "cpu", scale_dtype: torch.dtype | None = None,
              batch: int = 8, log=print) -> dict[str, tuple]:
    """GPTQ over the model's decoder linears (and the LM head): {module name: (packed,
    scales, zeros)} in quantize_int4's layout, rows in the fused module's order. Windows
    go through the model `batch` at a time (separate sequences of one prefill)."""
    from tandem.models.loader import load_model
    model = load_model(model_dir, torch.float32, torch.device(device))
    if any(type(m).__name__ == "FusedMoE" for m in model.modules()):
        raise ValueError("tandem quant gptq calibrates dense models; this one has experts")
    modules = dict(model.named_modules())
    names = [f"model.layers.{i}.{g}" for i in range(model.num_layers) for g in GROUPS]
    names += ["lm_head"] if lm_head else []
    out: dict[str, tuple] = {}
    for name in names:
        t0 = time.time()
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise ValueError(f"{name}: not a linear layer of this model")
        hessian = _input_hessian(model, module, windows, batch)
        w = module.weight.data
        result = gptq_int4(w, hessian, group_size, symmetric, damp, scale_dtype)
        if name != "lm_head":  # a tied head is the embedding: leave it; nothing runs after
            _set_weight(module, quant.dequantize_int4(*result, group_size))
        out[name] = tuple(None if t is None else t.cpu() for t in result)
        log(f"{name}: {tuple(w.shape)} in {time.time() - t0:.1f} s")
    return out


def _pack_zero_points(zeros: torch.Tensor) -> torch.Tensor:
    """uint8 (N, G') zero points (0..15, as tandem keeps them) -> compressed-tensors' int32
    (ceil(N/8), G'): row 8w + i at bits 4i of word w, down the output dimension (the
    inverse of compressed_tensors.unpack_zero_points)."""
    n, groups = zeros.shape
    padded = torch.zeros(-(-n // 8) * 8, groups, dtype=torch.int64)
    padded[:n] = zeros.to(torch.int64)
    words = sum(padded[i::8] << (4 * i) for i in range(8))
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _quantized_tensors(prefix: str, packed: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None, scale_dtype: torch.dtype
                       ) -> dict[str, torch.Tensor]:
    n = packed.shape[0]
    out = {f"{prefix}.weight_packed": packed.contiguous().view(torch.int32),
           f"{prefix}.weight_scale": scales.to(scale_dtype).contiguous(),
           f"{prefix}.weight_shape": torch.tensor([n, packed.shape[1] * 2], dtype=torch.int64)}
    if zeros is not None:
        out[f"{prefix}.weight_zero_point"] = _pack_zero_points(zeros)
    return out


def _split_rows(result: tuple, start: int, stop: int) -> tuple:
    packed, scales, zeros = result
    return (packed[start:stop], scales[start:stop],
            None if zeros is None else zeros[start:stop])


def write_checkpoint(model_dir: str, out_dir: str, results: dict[str, tuple],
                     group_size: int, symmetric: bool, scale_dtype: torch.dtype) -> None:
    """The checkpoint with each calibrated linear as compressed-tensors pack-quantized
    tensors (fused rows split back to the checkpoint's own tensors) and everything else
    as stored; config.json gains the `quantization_config` (and unties a quantized head)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tandem.models.loader import read_hf_config, safetensors_files
    stored: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                stored[name] = f.get_tensor(name)
    tensors: dict[str, torch.Tensor] = {}
    rows_written = dict.fromkeys(results, 0)
    for name, tensor in stored.items():
        module = name[:-len(".weight")] if name.endswith(".weight") else ""
        parent, _, leaf = module.rpartition(".")
        key, start = module, 0
        if leaf in FUSED:  # q_proj -> qkv_proj, from the rows of the parts before it
            fused, pos = FUSED[leaf]
            key = f"{parent}.{fused}"
            start = sum(stored[f"{parent}.{other}.weight"].shape[0]
                        for other, (f2, p2) in FUSED.items() if f2 == fused and p2 < pos)
        if key not in results:
            tensors[name] = tensor
            continue
        part = _split_rows(results[key], start, start + tensor.shape[0])
        tensors.update(_quantized_tensors(module, *part, scale_dtype))
        rows_written[key] += tensor.shape[0]
    if "lm_head" in results and rows_written["lm_head"] == 0:  # tied: the head gets its own
        tensors.update(_quantized_tensors("lm_head", *results["lm_head"], scale_dtype))
        rows_written["lm_head"] = results["lm_head"][0].shape[0]
    for key, result in results.items():  # every calibrated row written exactly once
        if rows_written[key] != result[0].shape[0]:
            raise RuntimeError(f"{key}: {rows_written[key]} of {result[0].shape[0]} rows "
                               f"found in the checkpoint's tensors")
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = read_hf_config(model_dir)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric,
                        "strategy": "group", "group_size": group_size, "dynamic": False,
                        "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None}},
        "ignore": [] if "lm_head" in results else ["lm_head"],
        "kv_cache_scheme": None}
    if "lm_head" in results:
        config["tie_word_embeddings"] = False  # the head is no longer the embedding
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for entry in os.listdir(model_dir):  # tokenizer, generation config, README, ...
        src = os.path.join(model_dir, entry)
        if (os.path.isfile(src) and not entry.endswith(".safetensors")
                and entry not in ("config.json", "model.safetensors.index.json")):
            shutil.copy(src, os.path.join(out_dir, entry))


def checkpoint_scale_dtype(model_dir: str) -> torch.dtype:
    """The dtype the checkpoint keeps its floats in (its scales are stored in it)."""
    from tandem.models.loader import read_hf_config
    hf = read_hf_config(model_dir)
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return _DTYPES.get(name, torch.float32)
