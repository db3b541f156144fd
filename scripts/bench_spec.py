"""Speculative decoding on this machine (CUDA when there is one, else the CPU): the
embedded model at batch 1, greedy, each proposer against plain decoding, on code prompts
from the shipped held-out files (bench/data/heldout_python.tar.gz) and on an edit-style
workload (the prompt holds code that the answer repeats with a small change).

    code    the first PROMPT_TOKENS tokens of each of the first N held-out files (sorted
            paths), OUTPUT_TOKENS generated
    edit    a held-out function, then "# The same function with `X` renamed to `Y`:" and
            its first line renamed; the model continues the copy for as many tokens as
            the function has

One run each way (plain, then each method), requests one after another. Prints a table
and one JSON line. Usage: python scripts/bench_spec.py [--files N] [--methods a,b,...]
[--k K] [--output-tokens T]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import tarfile
import tempfile
import time

from tandem import LLM, SamplingParams
from tandem.bench.cli import device_name, git_commit

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "bench", "data", "heldout_python.tar.gz")


def held_out_sources(n: int) -> list[str]:
    out = tempfile.mkdtemp(prefix="heldout")
    with tarfile.open(DATA) as tar:
        tar.extractall(out, filter="data")
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
                   if f.endswith(".py"))
    return [open(p, errors="replace").read() for p in paths[:n]]


def edit_prompts(sources: list[str], n: int) -> list[tuple[str, str]]:
    """(prompt, the function it quotes): a function (6-40 lines), then the request for a
    copy with an argument renamed, and the copy's first line."""
    prompts = []
    for src in sources:
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not node.args.args:
                continue
            body = lines[node.lineno - 1:node.end_lineno]
            if not 6 <= len(body) <= 40 or not body[0].rstrip().endswith(":"):
                continue  # a one-line signature, then a body of some length
            old = node.args.args[-1].arg
            if old == "self" or len(old) < 3 or sum(old in b for b in body[1:]) < 2:
                continue  # an argument the body uses
            new = old + "_value"
            fn = "\n".join(body)
            first = re.sub(rf"\b{old}\b", new, body[0])
            prompts.append((f"{fn}\n\n\n# The same function with `{old}` renamed to "
                            f"`{new}`:\n{first}\n", fn))
            break
        if len(prompts) == n:
            break
    return prompts


def run(llm: LLM, prompts: list[str], max_tokens: list[int]) -> tuple[float, int, list]:
    """Each prompt alone (batch 1), greedy, max_tokens[i] tokens; (seconds, tokens, ids)."""
    warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate(prompts[:1], warm, use_tqdm=False)
    t0 = time.perf_counter()
    n = 0
    outs = []
    for p, m in zip(prompts, max_tokens):
        sp = SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
        o = llm.generate([p], sp, use_tqdm=False)[0].outputs[0]
        outs.append(o.token_ids)
        n += len(o.token_ids)
    return time.perf_counter() - t0, n, outs


def _agreeing_prefix(outs: list[list[int]], ref: list[list[int]]) -> float:
    """The share of the reference's tokens before each output's first difference."""
    same = 0
    for o, r in zip(outs, ref):
        n = next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
        same += n
    return same / max(sum(len(r) for r in ref), 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--methods", default="ngram,suffix,draft_model")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-auto-switch", action="store_true",
                    help="always verify k drafts (speculative_config auto_switch=false)")
    args = ap.parse_args()
    sources = held_out_sources(4 * args.files)
    # on CUDA each engine takes a fifth of the memory (one at a time, the rest freed)
    base = LLM(max_model_len=2048, gpu_memory_utilization=0.2, dtype=args.dtype)
    tok = base.get_tokenizer()
    code = [tok.decode(tok.encode(s)[:args.prompt_tokens]) for s in sources[:args.files]]
    edit = edit_prompts(sources, args.files)
    # code: OUTPUT_TOKENS each; edit: as many as the quoted function (the answer's length)
    work = {"code": (code, [args.output_tokens] * len(code)),
            "edit": ([p for p, _ in edit], [len(tok.encode(fn)) for _, fn in edit])}
    results: dict = {}
    plain = {w: run(base, ps, ms) for w, (ps, ms) in work.items()}
    del base
    print(f"{'workload':8s} {'method':12s} {'tok/s':>8s} {'speedup':>8s} {'accept':>7s} "
          f"{'mean len':>8s} {'same':>5s} {'agree':>6s}")
    for w, (t, n, _) in plain.items():
        print(f"{w:8s} {'off':12s} {n / t:8.1f}")
        results[f"{w}/off"] = {"tokens_per_s": n / t, "prompts": len(work[w][0]),
                               "output_tokens": n}
    for method in args.methods.split(","):
        llm = LLM(max_model_len=2048, gpu_memory_utilization=0.2, dtype=args.dtype,
                  speculative_config={"method": method, "num_speculative_tokens": args.k,
                                      "auto_switch": not args.no_auto_switch})
        for w, (ps, ms) in work.items():
            before = llm.engine.stats()
            t, n, outs = run(llm, ps, ms)
            st = llm.engine.stats()
            drafted = st.spec_drafted_total - before.spec_drafted_total
            accepted = st.spec_accepted_total - before.spec_accepted_total
            steps = st.spec_verify_steps_total - before.spec_verify_steps_total
            rec = {"tokens_per_s": n / t, "speedup": plain[w][0] / t * n / plain[w][1],
                   "acceptance_rate": accepted / drafted if drafted else 0.0,
                   "mean_accepted_length": 1 + accepted / steps if steps else 1.0,
                   "same_tokens_as_plain": outs == plain[w][2],
                   # in bf16 a k+1-row verify is another GEMM than the 1-row step: a near
                   # tie may flip (then the texts part): the share before the first change
                   "agreeing_prefix": _agreeing_prefix(outs, plain[w][2])}
            results[f"{w}/{method}"] = rec
            print(f"{w:8s} {method:12s} {rec['tokens_per_s']:8.1f} {rec['speedup']:7.2f}x "
                  f"{rec['acceptance_rate']:7.2f} {rec['mean_accepted_length']:8.2f} "
                  f"{str(rec['same_tokens_as_plain']):>5s} {rec['agreeing_prefix']:6.3f}")
        del llm
    import torch
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps({"bench": f"spec_decode_{dev.type}", "device": device_name(dev), "model": "default (embedded) + embedded draft",
        "batch_size": 1, "k": args.k, "dtype": args.dtype,
        "auto_switch": not args.no_auto_switch, "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens, "files": args.files, "git_commit": git_commit(),
        "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
