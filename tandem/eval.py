"""`tandem eval --model DIR FILE...`: bits per byte and token perplexity of text files,
through the engine's prompt logprobs, beside each file's `xz -9` bits per byte.

Each file is tokenized whole and scored in windows of at most max_model_len - 2 tokens;
every window starts from the end-of-text token as context, so the first token of a file
is predicted from nothing but "a document starts here":

    window k:  <eos> t[kW] t[kW+1] ... t[kW+W-1]      scores t[kW .. kW+W-1]

bits = -sum(log p) / ln 2; bits per byte = bits / UTF-8 bytes; the total divides summed
bits by summed bytes (the same for xz: 8 x compressed size, file by file).

When stdout is a terminal, the engine's progress bar (on stderr) counts scored windows.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import sys
from dataclasses import dataclass

from tandem.bench.progress import add_progress_flag, show_progress


@dataclass(frozen=True, slots=True)
class FileScore:
    path: str
    num_bytes: int
    num_tokens: int
    model_bits: float
    xz_bits: int

    @property
    def bits_per_byte(self) -> float:
        return self.model_bits / self.num_bytes

    @property
    def xz_bits_per_byte(self) -> float:
        return self.xz_bits / self.num_bytes


def xz_bits(data: bytes) -> int:
    return 8 * len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))


def score_files(llm, paths: list[str], progress: bool = False) -> list[FileScore]:
    """Score every file through `llm` (an `LLM`) in one batch of windows; `progress` shows
    a bar of finished windows."""
    from tandem.request import SamplingParams
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("eval needs the model's tokenizer")
    context = tok.bos_token_id if tok.bos_token_id is not None else min(tok.eos_token_ids)
    width = llm.engine.max_model_len - 2
    texts, windows, owner = [], [], []
    for i, path in enumerate(paths):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text:
            raise ValueError(f"{path} is empty")
        texts.append(text)
        ids = tok.encode(text, add_special_tokens=False)
        for start in range(0, len(ids), width):
            windows.append([context] + ids[start:start + width])
            owner.append(i)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(windows, params, use_tqdm=progress)
    nats = [0.0] * len(paths)
    counts = [0] * len(paths)
    for w, o, i in zip(windows, outs, owner):
        for pos in range(1, len(w)):
            nats[i] -= o.prompt_logprobs[pos][w[pos]].logprob
        counts[i] += len(w) - 1
    scores = []
    for path, text, n, c in zip(paths, texts, nats, counts):
        data = text.encode("utf-8")
        scores.append(FileScore(path, len(data), c, n / math.log(2), xz_bits(data)))
    return scores


def expand_paths(files: list[str], suffix: str) -> list[str]:
    """Files as given, and the files ending in `suffix` under directories, sorted."""
    paths = [os.path.join(r, f) for p in files
             for r, f in ([(os.path.dirname(p), os.path.basename(p))] if os.path.isfile(p)
                          else [(d, f) for d, _, fs in os.walk(p) for f in sorted(fs)
                                if f.endswith(suffix)])]
    if not paths:
        raise ValueError("no files to evaluate")
    return sorted(paths)


def _run(args: argparse.Namespace) -> int:
    from tandem.assets import default_model_dir
    from tandem.cli import engine_kwargs
    from tandem.engine.llm import LLM
    llm = LLM(args.model or default_model_dir(), **engine_kwargs(args))
    scores = score_files(llm, expand_paths(args.files, args.suffix),
                         show_progress(args.no_progress))
    name = max(12, *(len(os.path.relpath(s.path)) for s in scores[:50]))
    print(f"{'file':<{name}}  {'bytes':>8}  {'tokens':>7}  {'bits/byte':>9}  {'xz bits/byte':>12}")
    for s in scores:
        print(f"{os.path.relpath(s.path):<{name}}  {s.num_bytes:>8}  {s.num_tokens:>7}  "
              f"{s.bits_per_byte:>9.3f}  {s.xz_bits_per_byte:>12.3f}")
    total_bytes = sum(s.num_bytes for s in scores)
    tokens = sum(s.num_tokens for s in scores)
    bits = sum(s.model_bits for s in scores)
    xz = sum(s.xz_bits for s in scores)
    record = {"benchmark": "eval", "model": args.model or "default", "num_files": len(scores),
              "bytes": total_bytes, "tokens": tokens, "bits_per_byte": bits / total_bytes,
              "token_perplexity": math.exp(bits * math.log(2) / tokens),
              "xz_bits_per_byte": xz / total_bytes,
              "ratio_to_xz": (bits / total_bytes) / (xz / total_bytes)}
    print(f"{'TOTAL':<{name}}  {total_bytes:>8}  {tokens:>7}  {record['bits_per_byte']:>9.3f}  "
          f"{record['xz_bits_per_byte']:>12.3f}   perplexity {record['token_perplexity']:.3f}")
    print(json.dumps(record))
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    from tandem.cli import add_engine_args
    p = sub.add_parser("eval", help="bits per byte of text files (vs xz -9)")
    p.add_argument("files", nargs="+", help="files or directories")
    p.add_argument("--model", default=None, help="model directory (default: embedded)")
    p.add_argument("--suffix", default=".py", help="file suffix to take from directories")
    add_progress_flag(p)
    add_engine_args(p)
    p.set_defaults(func=_run)


if __name__ == "__main__":
    from tandem.cli import main
    sys.exit(main(["eval"] + sys.argv[1:]))
