"""`tandem quant sensitivity --model DIR FILES...`: the sensitivity map and a policy.

Prints a table (one row per part, one column group per method), writes a heatmap PNG
(parts x methods, KL), a policy JSON built to a budget, and prints one JSON line last:

    tandem quant sensitivity --model DIR held_out/ --target-bits 4.25 \\
        --policy-out policy.json --heatmap map.png
    tandem eval --quantization policy.json held_out/     # what the policy really costs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from tandem.bench.progress import add_progress_flag, show_progress

NOT_MEASURED = {
    "attention": "not measured: the attention computation (QK^T, softmax, PV) has no "
                 "reduced-precision mode to probe yet",
}


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


def _heatmap(parts, probes, methods: list[str], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    names = [p.name for p in parts]
    kl = {(p.part, p.method): p.kl for p in probes}
    grid = np.array([[kl.get((n, m), np.nan) for m in methods] for n in names])
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 3, 0.32 * len(names) + 1.5))
    im = ax.imshow(np.log10(np.maximum(grid, 1e-7)), aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_title("log10 KL(base || part quantized), nats/token")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    bar = tqdm(total=len(jobs) + len(layers), desc="probes", file=sys.stderr,
               disable=not show_progress(args.no_progress))
    for part, method in jobs:
        probes.append(measurer.probe(part, method))
        bar.update()
    kv_probes = []
    for layer in layers:
        kv_probes.append(measurer.probe_kv(layer))
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
    for p in kv_probes:
        print(f"{p.part:<14}  fp8 KV cache: {p.kl:.2e} KL, {100 * p.bpb_increase:+.2f}% bpb, "
              f"top-1 {p.top1:.3f}")
    full_bits = sens.full_precision_bits(model_dir)
    policy, predicted = sens.build_policy(parts, probes, full_bits, args.target_bits,
                                          args.max_bpb_increase)
    if args.policy_out:
        with open(args.policy_out, "w") as f:
            json.dump({**policy.to_json(), "predicted": predicted}, f, indent=1)
        print(f"policy: {args.policy_out} (predicted {predicted['avg_bits']:.3f} bits/weight, "
              f"+{100 * predicted['bpb_increase']:.2f}% bits per byte)")
    if args.heatmap:
        _heatmap(parts, probes, methods, args.heatmap)
        print(f"heatmap: {args.heatmap}")
    print(json.dumps({
        "benchmark": "quant_sensitivity", "model": model_dir, "device": args.device,
        "windows": len(windows), "tokens": sum(len(w) - 1 for w in windows),
        "methods": methods, "elapsed_s": time.time() - t0,
        "probes": [dataclasses.asdict(p) for p in probes],
        "kv_probes": [dataclasses.asdict(p) for p in kv_probes],
        "activation_kl": activation, "not_measured": NOT_MEASURED,
        "policy": policy.to_json(), "predicted": predicted,
        "command": " ".join(["tandem"] + sys.argv[1:])}))
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
