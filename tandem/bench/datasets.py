"""Request sets for `tandem bench serve`, built (tokenized, serialized) before the clock starts.

    random         exact input/output lengths as token ids (or ranges, --random-range-ratio)
    mixed          classes of exact input lengths in given shares (--mix 0.8:256,0.2:8192),
                   shuffled: short chat turns among long documents
    shared-prefix  G groups x a shared prefix + a unique suffix (the prefix-caching workload)
    code           completions and fill-in-the-middle requests cut from Python files
    sharegpt       first human turn -> prompt, first reply's token count -> max_tokens
    jsonl          one request body per line, sent as is (plus stream and usage options)

Prompts that must be exact (random, shared-prefix) go out as token ids on /v1/completions,
so the server's tokenizer cannot change their length; the others as text.
"""

from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import dataclass
from typing import Any

from tandem.engine.tokenizer import Tokenizer

DATASETS = ("random", "mixed", "shared-prefix", "code", "sharegpt", "jsonl")
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class RequestSpec:
    path: str  # the endpoint: COMPLETIONS or CHAT
    body: bytes  # the JSON body, serialized ahead of time
    prompt_tokens: int  # as this side's tokenizer counts them
    max_tokens: int  # the output budget asked for


def _spec(path: str, body: dict[str, Any], prompt_tokens: int, model: str | None,
          ignore_eos: bool) -> RequestSpec:
    body = {**({"model": model} if model else {}), **body, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    return RequestSpec(path, json.dumps(body).encode(), prompt_tokens,
                       int(body.get("max_tokens") or body.get("max_completion_tokens") or 0))


def _lens(rng: random.Random, n: int, mean: int, ratio: float) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def _ids(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    return [rng.randrange(lo, hi) for _ in range(n)]


def _id_range(tok: Tokenizer) -> tuple[int, int]:
    """Token ids safe to draw at random: past the special tokens at the low end."""
    lo = max(tok.special_ids, default=-1) + 1
    return (lo if lo < tok.vocab_size // 2 else 0), tok.vocab_size


def random_dataset(tok: Tokenizer, n: int, input_len: int, output_len: int, ratio: float,
                   seed: int, model: str | None, ignore_eos: bool) -> list[RequestSpec]:
    rng = random.Random(seed)
    lo, hi = _id_range(tok)
    ins, outs = _lens(rng, n, input_len, ratio), _lens(rng, n, output_len, ratio)
    return [_spec(COMPLETIONS, {"prompt": _ids(rng, i, lo, hi), "max_tokens": o}, i, model,
                  ignore_eos) for i, o in zip(ins, outs)]


def parse_mix(text: str) -> list[tuple[float, int]]:
    """"0.8:256,0.2:8192" -> [(0.8, 256), (0.2, 8192)] (shares summing to 1)."""
    try:
        mix = [(float(a), int(b)) for a, b in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise ValueError(f"--mix takes SHARE:INPUT_LEN,..., got {text!r}") from None
    if not mix or any(f <= 0 or n < 1 for f, n in mix) or abs(sum(f for f, _ in mix) - 1) > 1e-6:
        raise ValueError(f"--mix: positive shares summing to 1 and lengths >= 1, got {text!r}")
    return mix


def mixed_dataset(tok: Tokenizer, n: int, mix: list[tuple[float, int]], output_len: int,
                  seed: int, model: str | None, ignore_eos: bool) -> list[RequestSpec]:
    """round(share x n) requests of each input length (the last class takes the rest),
    in a seeded random order."""
    rng = random.Random(seed)
    lo, hi = _id_range(tok)
    lens: list[int] = []
    for i, (share, length) in enumerate(mix):
        count = n - len(lens) if i == len(mix) - 1 else round(share * n)
        lens += [length] * count
    rng.shuffle(lens)
    return [_spec(COMPLETIONS, {"prompt": _ids(rng, i, lo, hi), "max_tokens": output_len}, i,
                  model, ignore_eos) for i in lens]


def shared_prefix_dataset(tok: Tokenizer, n: int, groups: int, prefix_len: int,
                          suffix_len: int, output_len: int, seed: int, model: str | None,
                          ignore_eos: bool) -> list[RequestSpec]:
    rng = random.Random(seed)
    lo, hi = _id_range(tok)
    prefixes = [_ids(rng, prefix_len, lo, hi) for _ in range(groups)]
    return [_spec(COMPLETIONS, {"prompt": prefixes[k % groups] + _ids(rng, suffix_len, lo, hi),
                                "max_tokens": output_len}, prefix_len + suffix_len, model,
                  ignore_eos) for k in range(n)]


def code_dataset(tok: Tokenizer, n: int, code_dir: str, input_len: int, output_len: int,
                 fim_ratio: float, seed: int, model: str | None,
                 ignore_eos: bool) -> list[RequestSpec]:
    """Cut each request from a Python file at a random line: the code before the cut (at
    most input_len tokens) is the prompt; with probability fim_ratio the code after the
    gap is sent as `suffix` (fill-in-the-middle)."""
    files = sorted(glob.glob(os.path.join(code_dir, "**", "*.py"), recursive=True))
    texts = [t for t in (open(f, encoding="utf-8", errors="replace").read() for f in files)
             if t.count("\n") > 4]
    if not texts:
        raise ValueError(f"no Python files with content under {code_dir!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lines = rng.choice(texts).splitlines(keepends=True)
        cut = rng.randint(1, len(lines) - 2)
        prefix = tok.decode(tok.encode("".join(lines[:cut]), False)[-input_len:])
        body: dict[str, Any] = {"prompt": prefix, "max_tokens": output_len}
        tokens = len(tok.encode(prefix, False))
        if rng.random() < fim_ratio:
            suffix_ids = tok.encode("".join(lines[cut + 1:]), False)[:max(1, input_len // 4)]
            body["suffix"] = tok.decode(suffix_ids)
            tokens += len(suffix_ids)
        out.append(_spec(COMPLETIONS, body, tokens, model, ignore_eos))
    return out


def sharegpt_dataset(tok: Tokenizer, n: int, path: str, max_output_len: int | None,
                     seed: int, model: str | None, ignore_eos: bool) -> list[RequestSpec]:
    with open(path, encoding="utf-8") as f:
        convs = json.load(f)
    pairs = []
    for conv in convs:
        turns = conv.get("conversations") or conv.get("conversation") or []
        if len(turns) >= 2 and turns[0].get("value") and turns[1].get("value"):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    if not pairs:
        raise ValueError(f"no human/assistant pairs in {path!r}")
    random.Random(seed).shuffle(pairs)
    out = []
    for prompt, reply in (pairs * (n // len(pairs) + 1))[:n]:
        out_len = max(1, len(tok.encode(reply, False)))
        if max_output_len:
            out_len = min(out_len, max_output_len)
        out.append(_spec(CHAT, {"messages": [{"role": "user", "content": prompt}],
                                "max_tokens": out_len},
                         len(tok.encode(prompt, False)), model, ignore_eos))
    return out


def jsonl_dataset(n: int, path: str, model: str | None, ignore_eos: bool) -> list[RequestSpec]:
    with open(path, encoding="utf-8") as f:
        bodies = [json.loads(line) for line in f if line.strip()]
    if not bodies:
        raise ValueError(f"no request bodies in {path!r}")
    out = []
    for body in (bodies * (n // len(bodies) + 1))[:n]:
        path_ = CHAT if "messages" in body else COMPLETIONS
        out.append(_spec(path_, body, 0, model if "model" not in body else None, ignore_eos))
    return out
