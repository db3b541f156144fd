"""`tandem quant sensitivity --model DIR FILES...`: the sensitivity map and a policy;
`tandem quant gptq --out DIR FILES...`: a GPTQ-calibrated INT4 checkpoint (calibrate.py).

Prints a table (one row per part, one column group per method), the per-layer KV-cache
and attention-computation probes, a per-layer table of everything at 8 bits, writes a
heatmap PNG (parts x methods, and layers x 8-bit probes, KL), a policy JSON built to a
budget, and prints one JSON line last:

    tandem quant sensitivity --model DIR held_out/ --target-bits 4.25 \\
        --policy-out policy.json --heatmap map.png
    tandem eval --quantization policy.json held_out/     # what the policy really costs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from tandem.bench.progress import add_progress_flag, show_progress

NOT_CHOSEN = {  # probes the map reports and the policy never picks
    "fp8_weight_only": "a baseline: the activations column is fp8 minus it",
    "fp8_kv": "the KV cache dtype is an engine flag (--kv-cache-dtype), not a policy rule",
    "fp8_attn": "emulated FP8 attention math: tandem has no FP8 attention kernel",
}
# the per-layer 8-bit table: column -> what it sums over the layer's attn and mlp parts
LAYER_COLUMNS = ("int8 W", "fp8 W", "fp8 A", "fp8 KV", "fp8 attn")


def _windows(model_dir: str, files: list[str], window: int, max_tokens: int
             ) -> list[list[int]]:
    """Token windows of the files (each starting from the end-of-text token as context),
    spread over the files, max_tokens in all."""
    from tandem.engine.tokenizer import Tokenizer
    tok = Tokenizer(model_dir)
    context = min(tok.eos_token_ids) if tok.eos_token_ids else 0
    per_file = [tok.encode(open(p, encoding="utf-8").read(), add_special_tokens=False)
                for p in files]
    windows: list[list[int]] = []
    total = 0
    start = 0
    while total < max_tokens and any(start < len(ids) for ids in per_file):
        for ids in per_file:  # round robin: every file contributes its first windows first
            if start < len(ids) and total < max_tokens:
                chunk = ids[start:start + min(window, max_tokens - total)]
                windows.append([context] + chunk)
                total += len(chunk)
        start += window
    return windows


def _per_layer(parts, probes, kv_probes, attn_probes) -> dict[int, dict[str, float | None]]:
    """Per layer, the KL of each 8-bit probe (LAYER_COLUMNS): weights and activations summed
    over the layer's attn and mlp parts, None where not probed."""
    kl = {(p.part, p.method): p.kl for p in probes}
    table: dict[int, dict[str, float | None]] = {}
    for layer in sorted({p.layer for p in parts if p.layer is not None}):
        names = [p.name for p in parts if p.layer == layer]

        def total(method: str, minus: str | None = None) -> float | None:
            if any((n, method) not in kl or (minus and (n, minus) not in kl) for n in names):
                return None
            return sum(kl[(n, method)] - (kl[(n, minus)] if minus else 0.0) for n in names)

        extra = {p.method: p.kl for p in kv_probes + attn_probes
                 if p.part.startswith(f"layer {layer} ")}
        table[layer] = {"int8 W": total("int8"), "fp8 W": total("fp8_weight_only"),
                        "fp8 A": total("fp8", "fp8_weight_only"), "fp8 KV": extra.get("fp8_kv"),
                        "fp8 attn": extra.get("fp8_attn")}
    return table


def _heatmap(parts, probes, methods: list[str], layer_table: dict, path: str) -> None:
    """Left: parts x weight methods. Right: layers x 8-bit probes. One colour scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    names = [p.name for p in parts]
    kl = {(p.part, p.method): p.kl for p in probes}
    grids = [np.array([[kl.get((n, m), np.nan) for m in methods] for n in names]),
             np.array([[np.nan if row[c] is None else row[c] for c in LAYER_COLUMNS]
                       for row in layer_table.values()]).reshape(-1, len(LAYER_COLUMNS))]
    logs = [np.log10(np.maximum(g, 1e-7)) for g in grids]
    lo = min(np.nanmin(g) for g in logs if np.isfinite(g).any())
    hi = max(np.nanmax(g) for g in logs if np.isfinite(g).any())
    fig, axes = plt.subplots(1, 2, figsize=(1.2 * (len(methods) + len(LAYER_COLUMNS)) + 4,
                                            0.32 * len(names) + 1.8),
                             gridspec_kw={"width_ratios": [len(methods), len(LAYER_COLUMNS)]})
    labels = [(methods, names, "weights, one part at a time"),
              (list(LAYER_COLUMNS), [f"layer {i}" for i in layer_table],
               "8 bits, per layer (W, A: attn + mlp)")]
    for ax, g, (cols, rows, title) in zip(axes, logs, labels):
        im = ax.imshow(g, aspect="auto", cmap="magma_r", vmin=lo, vmax=hi)
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes, label="log10 KL(base || probe), nats/token")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tandem.assets import default_model_dir
    from tandem.eval import expand_paths
    from tandem.models.loader import read_hf_config
    from tandem.quantization import sensitivity as sens

    model_dir = args.model or default_model_dir()
    methods = args.methods.split(",")
    parts = sens.model_parts(read_hf_config(model_dir))
    if args.keep_lm_head:  # as a uniform quantization= does: the head stays unquantized
        parts = [p for p in parts if p.kind != "lm_head"]
    windows = _windows(model_dir, expand_paths(args.files, args.suffix), args.window,
                       args.max_tokens)
    t0 = time.time()
    measurer = sens.Measurer(model_dir, windows, args.device)
    jobs = [(part, m) for part in parts for m in methods]
    jobs += [(part, "fp8_weight_only") for part in parts if "fp8" in methods]
    layers = sorted({p.layer for p in parts if p.layer is not None})
    probes = []
    bar = tqdm(total=len(jobs) + 2 * len(layers), desc="probes", file=sys.stderr,
               disable=not show_progress(args.no_progress))
    for part, method in jobs:
        probes.append(measurer.probe(part, method))
        bar.update()
    kv_probes, attn_probes = [], []
    for layer in layers:
        kv_probes.append(measurer.probe_kv(layer))
        bar.update()
        attn_probes.append(measurer.probe_attn(layer))
        bar.update()
    bar.close()
    kl = {(p.part, p.method): p for p in probes}
    print(f"{'part':<14}" + "".join(f"{m:>22}" for m in methods) + f"{'activations':>14}")
    print(f"{'':<14}" + "".join(f"{'KL / +bpb% / top1':>22}" for _ in methods)
          + f"{'KL (fp8 A)':>14}")
    activation = {}
    for part in parts:
        row = f"{part.name:<14}"
        for m in methods:
            p = kl[(part.name, m)]
            row += f"{p.kl:>9.2e} {100 * p.bpb_increase:>+6.2f} {p.top1:>5.3f}"
        if (part.name, "fp8_weight_only") in kl:
            activation[part.name] = kl[(part.name, "fp8")].kl - kl[(part.name,
                                                                    "fp8_weight_only")].kl
            row += f"{activation[part.name]:>14.2e}"
        print(row)
    for p in kv_probes + attn_probes:
        what = "fp8 KV cache" if p.method == "fp8_kv" else "fp8 attention math"
        print(f"{p.part:<20}  {what}: {p.kl:.2e} KL, {100 * p.bpb_increase:+.2f}% bpb, "
              f"top-1 {p.top1:.3f}")
    layer_table = _per_layer(parts, probes, kv_probes, attn_probes)
    print("KL per layer at 8 bits (W = weights, A = activations: attn + mlp parts summed)")
    print(f"{'layer':<8}" + "".join(f"{c:>11}" for c in LAYER_COLUMNS))
    for layer, row in layer_table.items():
        print(f"{layer:<8}" + "".join(f"{'-':>11}" if row[c] is None else f"{row[c]:>11.2e}"
                                      for c in LAYER_COLUMNS))
    full_bits = sens.full_precision_bits(model_dir)
    policy, predicted = sens.build_policy(parts, probes, full_bits, args.target_bits,
                                          args.max_bpb_increase)
    if args.policy_out:
        with open(args.policy_out, "w") as f:
            json.dump({**policy.to_json(), "predicted": predicted}, f, indent=1)
        print(f"policy: {args.policy_out} (predicted {predicted['avg_bits']:.3f} bits/weight, "
              f"+{100 * predicted['bpb_increase']:.2f}% bits per byte)")
    if args.heatmap:
        _heatmap(parts, probes, methods, layer_table, args.heatmap)
        print(f"heatmap: {args.heatmap}")
    print(json.dumps({
        "benchmark": "quant_sensitivity", "model": model_dir, "device": args.device,
        "windows": len(windows), "tokens": sum(len(w) - 1 for w in windows),
        "methods": methods, "elapsed_s": time.time() - t0,
        "probes": [dataclasses.asdict(p) for p in probes],
        "kv_probes": [dataclasses.asdict(p) for p in kv_probes],
        "attn_probes": [dataclasses.asdict(p) for p in attn_probes],
        "activation_kl": activation, "per_layer_8bit": layer_table, "not_chosen": NOT_CHOSEN,
        "policy": policy.to_json(), "predicted": predicted,
        "command": " ".join(["tandem"] + sys.argv[1:])}))
    return 0


def _run_gptq(args: argparse.Namespace) -> int:
    from tandem.assets import default_model_dir
    from tandem.eval import expand_paths
    from tandem.quantization import calibrate as cal

    model_dir = args.model or default_model_dir()
    files = expand_paths(args.files, args.suffix)  # ValueError when there are none
    if os.path.realpath(args.out) == os.path.realpath(model_dir):
        raise ValueError(f"--out {args.out} is the model directory; write the quantized "
                         f"checkpoint elsewhere")
    t0 = time.time()
    windows = cal.calibration_windows(model_dir, files, args.window, args.max_tokens)
    tokens, need = sum(len(w) for w in windows), min(args.max_tokens, 2 * args.window)
    if tokens < need:
        raise ValueError(f"the calibration files hold {tokens} tokens; GPTQ wants at least "
                         f"{need} (two windows, or --max-tokens)")
    scale_dtype = cal.checkpoint_scale_dtype(model_dir)
    say = (lambda m: None) if args.no_progress else (lambda m: print(m, file=sys.stderr))
    results = cal.calibrate(model_dir, windows, args.group_size, not args.asymmetric,
                            args.lm_head, args.damp, args.device, scale_dtype, log=say)
    cal.write_checkpoint(model_dir, args.out, results, args.group_size, not args.asymmetric,
                         scale_dtype)
    print(json.dumps({
        "benchmark": "quant_gptq", "model": model_dir, "out": args.out,
        "scheme": f"int4{'' if not args.asymmetric else '_asym'}_g{args.group_size}",
        "lm_head": args.lm_head, "files": len(files), "windows": len(windows),
        "tokens": tokens, "linears": len(results),
        "elapsed_s": time.time() - t0, "command": " ".join(["tandem"] + sys.argv[1:])}))
    return 0


def add_quant_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quant", help="quantization tools (sensitivity map, policies)")
    qsub = p.add_subparsers(dest="quant_command", required=True)
    s = qsub.add_parser("sensitivity", help="quality cost of quantizing one part at a time, "
                        "and a per-layer policy built from it")
    s.add_argument("files", nargs="+", help="held-out text files or directories")
    s.add_argument("--model", default=None, help="model directory (default: embedded)")
    s.add_argument("--suffix", default=".py", help="file suffix to take from directories")
    s.add_argument("--methods", default="int4_asym_g256,int4,int4_asym,int4_asym_g64,int8,fp8",
                   help="weight methods to probe, comma-separated")
    s.add_argument("--window", type=int, default=512, help="tokens per window")
    s.add_argument("--max-tokens", type=int, default=8192, help="tokens scored per probe")
    s.add_argument("--device", default="cpu")
    budget = s.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-bits", type=float, default=None,
                        help="average bits per weight the policy may spend")
    budget.add_argument("--max-bpb-increase", type=float, default=None,
                        help="predicted relative bits-per-byte increase allowed (0.01 = 1%%)")
    s.add_argument("--keep-lm-head", action="store_true",
                   help="leave the LM head unquantized and out of the bit budget (as a "
                        "uniform --quantization does), so budgets compare with it")
    s.add_argument("--policy-out", default=None, help="write the policy JSON here")
    s.add_argument("--heatmap", default=None, help="write the heatmap PNG here")
    add_progress_flag(s)
    s.set_defaults(func=_run)
    g = qsub.add_parser("gptq", help="INT4 weights calibrated with GPTQ, written as a "
                        "compressed-tensors checkpoint (loads without flags)")
    g.add_argument("files", nargs="+", help="calibration text files or directories (keep "
                   "them apart from the files you evaluate on)")
    g.add_argument("--model", default=None, help="model directory (default: embedded)")
    g.add_argument("--out", required=True, help="directory for the quantized checkpoint")
    g.add_argument("--suffix", default=".py", help="file suffix to take from directories")
    g.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128, 256),
                   help="inputs per scale (the int4 kernels take 32-256)")
    g.add_argument("--asymmetric", action="store_true", help="zero points (int4_asym)")
    g.add_argument("--lm-head", action="store_true",
                   help="quantize the LM head too (a tied one gets its own tensors)")
    g.add_argument("--window", type=int, default=512, help="tokens per calibration window")
    g.add_argument("--max-tokens", type=int, default=32768, help="calibration tokens")
    g.add_argument("--damp", type=float, default=0.01,
                   help="added to the Hessian's diagonal, times its mean")
    g.add_argument("--device", default="cpu", help="where calibration runs (cpu, cuda)")
    g.add_argument("--no-progress", action="store_true",
                   help="no per-layer lines on stderr (the JSON line still comes last)")
    g.set_defaults(func=_run_gptq)
