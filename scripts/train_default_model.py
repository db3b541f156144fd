#!/usr/bin/env python3
"""Train tandem's embedded default model (a tiny Python code-completion Llama) and its draft.

One GPU, one process, one wall-clock budget (``--budget-s``, counted from start-up):

  .py files under the running Python's sysconfig paths -> filter, dedup by sha256, hold out
  ~1% BY FILE (seeded) -> byte-level BPE (8192, 4 special tokens) -> fill-in-the-middle on
  half the training files -> one packed token stream on the GPU -> main and draft model train
  on the same batches until the deadline -> held-out loss and bits per byte, next to per-file
  xz -9e -> export Hugging Face Llama directories and check that transformers loads them with
  the same logits -> tarballs, loss curve and metrics under ``--out``, metrics as the last line.

The model module below is a plain Llama whose parameter names are exactly those of
``transformers.LlamaForCausalLM``, so export is ``load_state_dict`` + ``save_pretrained``.

Run (one H100, ~9 minutes all told):
  PYTHONUNBUFFERED=1 python3 scripts/train_default_model.py --out $OUT
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import io
import json
import lzma
import math
import multiprocessing as mp
import os
import queue
import random
import re
import sysconfig
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

T0 = time.time()
EOT, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
SPECIAL_TOKENS = [EOT, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]  # ids 0, 1, 2, 3


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- corpus


@dataclass(frozen=True, slots=True)
class SourceFile:
    name: str  # "stdlib/json/decoder.py" or "site-packages/numpy/linalg/_linalg.py"
    text: str
    sha256: str
    num_bytes: int  # UTF-8 bytes of text


def _display_name(path: str, stdlib_roots: list[str]) -> str:
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            return "site-packages/" + path.split(marker, 1)[1]
    for root in stdlib_roots:
        if path.startswith(root + "/"):
            return "stdlib/" + path[len(root) + 1:]
    return "other/" + path.lstrip("/")


def _read_filtered(path: str, max_bytes: int) -> tuple[str, str, int] | str:
    """(text, sha256, bytes) for a plausible hand-written source file, else the reason to skip."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return "unreadable"
    if len(data) < 64:
        return "tiny"
    if len(data) > max_bytes:
        return "large"
    if b"\x00" in data:
        return "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8"
    # Generated tables, embedded blobs and minified code: few, very long lines.
    if max(map(len, data.split(b"\n"))) > 1000 or len(data) / (data.count(b"\n") + 1) > 100:
        return "long_lines"
    control = len(data) - len(data.translate(None, bytes(range(32)))) - data.count(b"\n") - data.count(b"\t")
    if control > len(data) // 1000:
        return "control_chars"
    return text, hashlib.sha256(data).hexdigest(), len(data)


def gather_corpus(max_bytes: int, max_files: int, seed: int) -> tuple[list[SourceFile], dict]:
    """Every .py under stdlib/platstdlib/purelib/platlib, filtered and deduplicated by content."""
    paths = sysconfig.get_paths()
    roots = sorted({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    stdlib_roots = sorted({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")}, key=len, reverse=True)
    found: set[str] = set()
    for root in roots:
        for dirpath, _, filenames in os.walk(root):
            found.update(os.path.realpath(os.path.join(dirpath, f)) for f in filenames if f.endswith(".py"))
    candidates = sorted(found)
    if max_files and len(candidates) > max_files:  # smoke tests only
        candidates = sorted(random.Random(seed).sample(candidates, max_files))
    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: _read_filtered(p, max_bytes), candidates, chunksize=64))
    stats = {"roots": roots, "py_files_found": len(candidates), "skipped": {}}
    files, seen = [], set()
    for path, res in zip(candidates, results):
        if isinstance(res, str):
            stats["skipped"][res] = stats["skipped"].get(res, 0) + 1
            continue
        text, digest, nbytes = res
        if digest in seen:
            stats["skipped"]["duplicate"] = stats["skipped"].get("duplicate", 0) + 1
            continue
        seen.add(digest)
        files.append(SourceFile(_display_name(path, stdlib_roots), text, digest, nbytes))
    stats["unique_files"] = len(files)
    stats["unique_bytes"] = sum(f.num_bytes for f in files)
    stats["stdlib_files"] = sum(f.name.startswith("stdlib/") for f in files)
    stats["site_packages_files"] = sum(f.name.startswith("site-packages/") for f in files)
    return files, stats


def split_by_file(files: list[SourceFile], heldout_frac: float, seed: int) -> tuple[list, list]:
    order = sorted(files, key=lambda f: f.sha256)
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(len(order) * heldout_frac))
    return order[n_heldout:], order[:n_heldout]


def xz_bits(text: str) -> int:
    """Bits of one file compressed alone with xz -9e (the per-file baseline)."""
    return 8 * len(lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(files: list[SourceFile], vocab_size: int, sample_bytes: int, seed: int):
    """Byte-level BPE: no normalizer, ByteLevel(add_prefix_space=False) both ways, so that
    decode(encode(source)) == source for any UTF-8 text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sample, total = [], 0
    for f in random.Random(seed + 1).sample(files, len(files)):
        if total >= sample_bytes:
            break
        sample.append(f.text)
        total += f.num_bytes
    tok.train_from_iterator(sample, trainer, length=len(sample))
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3]
    return tok, total


def write_tokenizer_files(tok, out_dir: Path, max_len: int) -> None:
    tok.encode_special_tokens = False  # shipped behaviour: "<|endoftext|>" in a prompt is the token
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": None,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,  # True would rewrite " ." etc. and break code
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True} for i, s in enumerate(SPECIAL_TOKENS)},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_documents(tok, files: list[SourceFile], fim_rate: float, fim_piece_chars: int,
                     cut_every_chars: int, rng: random.Random) -> tuple[np.ndarray, int]:
    """Files as one token stream, each document followed by <|endoftext|>.

    With probability fim_rate a file becomes fill-in-the-middle documents in PSM order:
        <|fim_prefix|> pre <|fim_suffix|> suf <|fim_middle|> mid <|endoftext|>
    (middle chosen by _fim_span). Long files are first cut at line boundaries into pieces of
    <= fim_piece_chars, so that prefix, suffix and middle fit one 2048-token window.

    Other files are encoded in pieces cut at a few random places (~1 per cut_every_chars), so
    the model also sees the token boundary a prompt makes: "):\n" + "    return" encodes as
    "):", "\n", "   ", " return", while whole text never has a lone "\n" before indentation.
    """
    segments: list[str] = []  # strings to encode, in order
    layout: list[list[int]] = []  # per document: ids >= 0 as is, -1 - k = segments[k]'s ids
    num_fim = 0
    for f in files:
        if rng.random() >= fim_rate:
            cuts = [0] + _prompt_like_cuts(f.text, cut_every_chars, rng) + [len(f.text)]
            layout.append([-1 - len(segments) - i for i in range(len(cuts) - 1)] + [0])
            segments += [f.text[a:b] for a, b in zip(cuts, cuts[1:])]
            continue
        num_fim += 1
        for piece in _line_pieces(f.text, fim_piece_chars):
            i, j = _fim_span(piece, rng)
            s = len(segments)
            segments += [piece[:i], piece[j:], piece[i:j]]
            layout.append([1, -1 - s, 2, -2 - s, 3, -3 - s, 0])
    ids = [e.ids for e in tok.encode_batch_fast(segments, add_special_tokens=False)]
    stream: list[int] = []
    for doc in layout:
        for x in doc:
            if x >= 0:
                stream.append(x)
            else:
                stream.extend(ids[-1 - x])
    return np.asarray(stream, dtype=np.int32), num_fim


def _fim_span(piece: str, rng: random.Random) -> tuple[int, int]:
    """(i, j) with middle = piece[i:j]. Half the time two uniform character positions (long
    middles, any boundary); half the time 1-6 whole lines, starting at the line's start or after
    its indentation (where an editor's cursor is), so the model also learns to stop early."""
    if rng.random() < 0.5:
        i, j = sorted(rng.randint(0, len(piece)) for _ in range(2))
        return i, j
    starts = [0] + [m.end() for m in re.finditer("\n", piece) if m.end() < len(piece)]
    a = rng.randrange(len(starts))
    b = a + rng.choice((1, 1, 1, 2, 2, 3, 4, 6))
    i, j = starts[a], starts[b] if b < len(starts) else len(piece)
    if rng.random() < 0.5:
        line = piece[i:j]
        i += len(line) - len(line.lstrip(" \t"))
    return i, j


def _prompt_like_cuts(text: str, every: int, rng: random.Random) -> list[int]:
    """Sorted cut positions: a third anywhere, a third at a line start, a third after indentation."""
    if every <= 0 or len(text) < 2:
        return []
    cuts = set()
    for _ in range(int(len(text) / every + rng.random())):
        pos, kind = rng.randrange(1, len(text)), rng.random()
        if kind < 2 / 3:
            pos = text.rfind("\n", 0, pos) + 1  # start of the line holding pos
            if kind < 1 / 3:
                line = text[pos:pos + 256]
                pos += len(line) - len(line.lstrip(" \t"))
        if 0 < pos < len(text):
            cuts.add(pos)
    return sorted(cuts)


class BackgroundEncoder(threading.Thread):
    """Encodes the training files chunk by chunk while the GPU trains on what is ready.

    The tokenizers library releases the GIL inside encode_batch, so the training loop keeps
    running; chunks come out through `ready` as int32 arrays, in file order.
    """

    def __init__(self, tok, files: list[SourceFile], chunk_bytes: int, fim_rate: float,
                 fim_piece_chars: int, cut_every_chars: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.tok, self.fim_rate, self.fim_piece_chars = tok, fim_rate, fim_piece_chars
        self.cut_every_chars = cut_every_chars
        self.rng = random.Random(seed + 2)
        self.chunks: list[list[SourceFile]] = [[]]
        size = 0
        for f in files:
            if size >= chunk_bytes:
                self.chunks.append([])
                size = 0
            self.chunks[-1].append(f)
            size += f.num_bytes
        self.ready: queue.Queue[np.ndarray] = queue.Queue()
        self.num_fim = 0
        self.seconds = 0.0

    def run(self) -> None:
        t = time.time()
        for chunk in self.chunks:
            arr, num_fim = encode_documents(self.tok, chunk, self.fim_rate, self.fim_piece_chars,
                                            self.cut_every_chars, self.rng)
            self.num_fim += num_fim
            self.seconds = time.time() - t
            self.ready.put(arr)


def _line_pieces(text: str, max_chars: int) -> list[str]:
    pieces, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        if cur and n + len(line) > max_chars:
            pieces.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        pieces.append("".join(cur))
    return pieces


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # normalise in fp32, scale in the input dtype (as transformers does)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, s.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # (T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv  # query head h reads kv head h // rep
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = MLP(s)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_hidden_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class Llama(nn.Module):
    """Parameter names match transformers' LlamaForCausalLM; lm_head is tied to embed_tokens."""

    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.shape = s
        self.model = LlamaBody(s)
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim))
        freqs = torch.outer(torch.arange(s.max_position_embeddings, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_pos, hd)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # residual-branch outputs start smaller
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * s.num_hidden_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weight counted once

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.model.embed_tokens(idx)  # (B, T, hidden)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


# ----------------------------------------------------------------------------- training


@dataclass
class Trainee:
    name: str
    model: Llama
    step_fn: object  # compiled (or eager) model, called as step_fn(x, y) -> loss
    opt: torch.optim.Optimizer
    peak_lr: float
    loss_sum: torch.Tensor  # running sum of losses since the last log line, on device


def make_trainee(name: str, shape: LlamaShape, lr: float, device: str, compile_model: bool) -> Trainee:
    model = Llama(shape).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")
    step_fn = torch.compile(model) if compile_model else model
    return Trainee(name, model, step_fn, opt, lr, torch.zeros((), device=device))


def lr_factor(step: int, progress: float, warmup_steps: int) -> float:
    """Linear warm-up by step, then cosine to 10% by wall-clock progress in [0, 1]."""
    warm = min(1.0, (step + 1) / warmup_steps)
    return warm * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def train_step(t: Trainee, x: torch.Tensor, y: torch.Tensor, lr: float, device: str) -> None:
    for g in t.opt.param_groups:
        g["lr"] = lr
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = t.step_fn(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(t.model.parameters(), 1.0)
    t.opt.step()
    t.opt.zero_grad(set_to_none=True)
    t.loss_sum += loss.detach()


class PackedStream:
    """The training token stream on the device, growing as the background encoder delivers.

    A batch is batch_size windows of seq_len + 1 tokens at uniform random offsets into what has
    arrived so far (documents are packed back to back; attention crosses <|endoftext|>).
    """

    def __init__(self, capacity: int, device: str, seed: int) -> None:
        self.buf = torch.empty(capacity, dtype=torch.int32, device=device)  # (capacity,)
        self.size, self.chunks_in = 0, 0
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def append(self, arr: np.ndarray) -> None:
        if self.size + arr.size > self.buf.numel():
            grown = torch.empty(2 * (self.size + arr.size), dtype=torch.int32, device=self.buf.device)
            grown[:self.size] = self.buf[:self.size]
            self.buf = grown
        self.buf[self.size:self.size + arr.size] = torch.from_numpy(arr).to(self.buf.device)
        self.size += arr.size

    def pull(self, encoder: BackgroundEncoder, min_size: int = 0, wait_all: bool = False) -> None:
        """Append the encoder's finished chunks; block until min_size tokens (or all chunks)."""
        while self.chunks_in < len(encoder.chunks) and (
                wait_all or self.size < min_size or not encoder.ready.empty()):
            self.append(encoder.ready.get())
            self.chunks_in += 1
            if self.chunks_in == len(encoder.chunks):
                log(f"all {self.size / 1e6:.1f}M training tokens on device ({encoder.seconds:.1f}s to encode)")

    def batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.size - seq_len - 1, (batch_size, 1), device=self.buf.device,
                               generator=self.gen)
        idx = starts + torch.arange(seq_len + 1, device=self.buf.device)  # (B, T + 1)
        buf = self.buf[idx].long()
        return buf[:, :-1], buf[:, 1:]


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_nats(model: Llama, docs: list[list[int]], seq_len: int, stride: int, device: str,
                 batch_size: int = 16) -> list[float]:
    """Total -ln p(token) per document. Each doc starts with <|endoftext|> (context only); every
    other token is scored once. Docs longer than seq_len+1 tokens are scored in sliding windows:
    each later window keeps seq_len - stride tokens of context and scores the next stride tokens."""
    windows = []  # (doc index, start, end, first scored target offset within the window)
    for d, ids in enumerate(docs):
        n, end = len(ids), 0  # targets 1..end scored so far
        while end < n - 1:
            new_end = min(n - 1, end + (seq_len if end == 0 else stride))
            start = max(0, new_end - seq_len)
            windows.append((d, start, new_end, end - start))
            end = new_end
    windows.sort(key=lambda w: w[2] - w[1])
    totals = [0.0] * len(docs)
    model.eval()
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        L = max(e - s for _, s, e, _ in chunk)
        inp = torch.zeros(len(chunk), L, dtype=torch.long)
        tgt = torch.full((len(chunk), L), -100, dtype=torch.long)
        for i, (d, s, e, first) in enumerate(chunk):
            ids = torch.tensor(docs[d][s:e + 1])
            inp[i, :e - s] = ids[:-1]
            tgt[i, first:e - s] = ids[1 + first:]
        inp, tgt = inp.to(device), tgt.to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(inp)
        nll = F.cross_entropy(logits.float().transpose(1, 2), tgt, ignore_index=-100, reduction="none")
        for (d, *_), v in zip(chunk, nll.sum(1).double().cpu().tolist()):
            totals[d] += v
    model.train()
    return totals


def evaluate(model: Llama, docs: list[list[int]], num_bytes: list[int], seq_len: int, device: str) -> dict:
    nats = heldout_nats(model, docs, seq_len, seq_len // 2, device)
    tokens = sum(len(d) - 1 for d in docs)
    return {"loss": sum(nats) / tokens, "bits_per_byte": sum(nats) / math.log(2) / sum(num_bytes),
            "tokens": tokens, "per_file_bits": [n / math.log(2) for n in nats]}


# ----------------------------------------------------------------------------- export


def export_hf(model: Llama, out_dir: Path, tok, eot_id: int) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    s = model.shape
    config = LlamaConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim, hidden_act="silu",
        max_position_embeddings=s.max_position_embeddings, rope_theta=s.rope_theta,
        rms_norm_eps=s.rms_norm_eps, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        bos_token_id=eot_id, eos_token_id=eot_id, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    hf = LlamaForCausalLM(config).to(torch.bfloat16)
    state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    hf.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir, safe_serialization=True)
    write_tokenizer_files(tok, out_dir, s.max_position_embeddings)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"  # older readers look for torch_dtype
    cfg["rope_theta"] = s.rope_theta  # transformers 5 nests it in rope_parameters; older readers don't
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def verify_export(model: Llama, out_dir: Path, sample_ids: list[int], sample_text: str, device: str) -> dict:
    """Load the directory with transformers; logits must match our module on the same bf16 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    assert hf_tok.decode(hf_tok.encode(sample_text)) == sample_text, "tokenizer does not round-trip"
    assert hf_tok.eos_token_id == 0 and hf_tok.bos_token_id == 0
    hf = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(device).eval()
    ref = Llama(model.shape).to(device).eval()
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    idx = torch.tensor([sample_ids[: model.shape.max_position_embeddings]], device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        a, b = hf(idx).logits.float(), ref(idx).float()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    rel = ((a - b).norm() / b.norm()).item()
    result = {"tokens": idx.shape[1], "max_abs_diff": (a - b).abs().max().item(), "rel_diff": rel,
              "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
    assert rel < 1e-3, f"transformers logits differ from the training module: {result}"
    return result


def tar_dir_parts(dirs: dict[str, Path], out: Path, stem: str, part_bytes: int) -> list[str]:
    """One tar of several directories, cut into parts of part_bytes (the tool returns files <= 16 MiB)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for arc, d in dirs.items():
            tar.add(d, arcname=arc)
    data, names = buf.getvalue(), []
    for i in range(0, len(data), part_bytes):
        names.append(f"{stem}.{i // part_bytes:02d}")
        (out / names[-1]).write_bytes(data[i:i + part_bytes])
    return names


# ----------------------------------------------------------------------------- main


ARGS = [  # (flag, default, help); every flag's type is its default's type
    ("out", os.environ.get("OUT", "out"), "where tarballs, curve, metrics and nothing else go"),
    ("budget-s", 540.0, "wall clock for the whole script, from start-up"),
    ("reserve-s", 40.0, "kept after training for evaluation and export"),
    ("seed", 1337, ""),
    ("max-file-bytes", 200_000, "skip larger source files"),
    ("max-files", 0, "sample this many .py paths (0: all; for quick tests)"),
    ("heldout-frac", 0.01, "fraction of unique files held out"),
    ("vocab-size", 8192, ""),
    ("tokenizer-sample-mb", 32.0, "training text the BPE trainer sees"),
    ("chunk-mb", 24.0, "background encoding chunk"),
    ("fim-rate", 0.5, "fraction of training files turned into FIM documents"),
    ("fim-piece-chars", 4000, "long files are cut into pieces of this size before FIM"),
    ("cut-every-chars", 400, "prompt-like token boundaries in plain documents (0: none)"),
    ("seq-len", 2048, ""),
    ("batch-size", 64, "sequences per step"),
    ("hidden", 512, ""), ("layers", 6, ""), ("heads", 8, ""), ("kv-heads", 2, ""), ("intermediate", 1536, ""),
    ("lr", 2e-3, "peak AdamW learning rate, main model"),
    ("draft-hidden", 256, ""), ("draft-layers", 2, ""), ("draft-heads", 4, ""), ("draft-kv-heads", 2, ""),
    ("draft-intermediate", 768, ""),
    ("draft-lr", 3e-3, ""),
    ("warmup-steps", 100, ""),
    ("min-steps", 10, "train at least this many steps whatever the clock says"),
    ("log-every", 25, "steps per log line and loss-curve point"),
    ("bench-files", 40, "held-out files shipped for CPU evaluation"),
    ("bench-max-bytes", 1_500_000, ""),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, help_ in ARGS:
        p.add_argument("--" + flag, type=type(default), default=default, help=help_ or None)
    p.add_argument("--no-compile", action="store_true", help="eager PyTorch (CPU tests)")
    return p.parse_args()


def pick_bench_files(heldout: list[SourceFile], n: int, max_total: int, seed: int) -> list[int]:
    """Indices of ~n held-out files of moderate size (1-64 KB), at most max_total bytes together."""
    idx = [i for i, f in enumerate(heldout) if 1000 <= f.num_bytes <= 64_000]
    random.Random(seed + 3).shuffle(idx)
    chosen, total = [], 0
    for i in idx:
        if len(chosen) == n:
            break
        if total + heldout[i].num_bytes <= max_total:
            chosen.append(i)
            total += heldout[i].num_bytes
    return sorted(chosen, key=lambda i: heldout[i].name)


def train(trainees: list[Trainee], stream: PackedStream, encoder: BackgroundEncoder, args: argparse.Namespace,
          train_end: float, device: str) -> tuple[int, list[dict], float]:
    """Both models step on the same batch until train_end; returns (steps, loss curve, compile seconds)."""
    curve, step, tokens_per_step = [], 0, args.batch_size * args.seq_len
    start = t_log = time.time()
    step_log, t_first = 0, None
    while step < args.min_steps or time.time() < train_end:
        progress = 0.0 if t_first is None else (time.time() - t_first) / max(1e-6, train_end - t_first)
        stream.pull(encoder)
        x, y = stream.batch(args.batch_size, args.seq_len)
        for tr in trainees:
            train_step(tr, x, y, tr.peak_lr * lr_factor(step, progress, args.warmup_steps), device)
        step += 1
        if t_first is None:  # the first step compiles; the LR clock and tokens/s start after it
            torch.cuda.synchronize() if device == "cuda" else None
            t_first = t_log = time.time()
            log(f"first step (compile) {t_first - start:.1f}s")
            step_log = step
            for tr in trainees:
                tr.loss_sum.zero_()
        if step % args.log_every == 0:
            losses = {tr.name: tr.loss_sum.item() / (step - step_log) for tr in trainees}
            for tr in trainees:
                tr.loss_sum.zero_()
            now = time.time()
            tok_s = (step - step_log) * tokens_per_step / (now - t_log)
            curve.append({"step": step, "tokens": step * tokens_per_step, "loss": losses["main"],
                          "draft_loss": losses["draft"], "time_s": round(now - start, 2)})
            log(f"step {step} tokens {step * tokens_per_step / 1e6:.1f}M loss {losses['main']:.4f} "
                f"draft {losses['draft']:.4f} lr {trainees[0].opt.param_groups[0]['lr']:.2e} "
                f"{tok_s / 1e3:.0f}k tok/s, stream {stream.size / 1e6:.0f}M")
            t_log, step_log = now, step
    if device == "cuda":
        torch.cuda.synchronize()
    return step, curve, t_first - start


def write_bench_tar(path: Path, heldout: list[SourceFile], manifest: list[dict]) -> None:
    """The chosen held-out files under their display names, plus MANIFEST.json (fixed mtimes)."""
    members = [(m["name"], heldout[m["index"]].text.encode("utf-8")) for m in manifest]
    members.append(("MANIFEST.json", (json.dumps(manifest, indent=1) + "\n").encode()))
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def main() -> None:
    args = parse_args()
    # The tokenizers library's thread pool: leave a core for the training loop's Python thread.
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timings: dict[str, float] = {}

    files, corpus = gather_corpus(args.max_file_bytes, args.max_files, args.seed)
    train_files, heldout = split_by_file(files, args.heldout_frac, args.seed)
    heldout_bytes = [f.num_bytes for f in heldout]
    corpus.update(train_files=len(train_files), train_bytes=sum(f.num_bytes for f in train_files),
                  heldout_files=len(heldout), heldout_bytes=sum(heldout_bytes))
    timings["gather_s"] = time.time() - T0
    log(f"corpus {json.dumps(corpus)}")
    # xz baseline in worker processes, forked before CUDA and tokenizer threads exist.
    xz_pool = mp.get_context("fork").Pool(4)
    xz_async = xz_pool.map_async(xz_bits, [f.text for f in heldout], chunksize=4)

    t = time.time()
    tok, tok_sample_bytes = train_tokenizer(train_files, args.vocab_size, int(args.tokenizer_sample_mb * 1e6), args.seed)
    timings["tokenizer_s"] = time.time() - t
    log(f"tokenizer: vocab {tok.get_vocab_size()}, {tok_sample_bytes / 1e6:.1f} MB sample, {timings['tokenizer_s']:.1f}s")
    for f in heldout:
        assert tok.decode(tok.encode(f.text).ids, skip_special_tokens=False) == f.text, f"round trip: {f.name}"
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in source is plain text here
    heldout_docs = [[0] + e.ids for e in tok.encode_batch_fast([f.text for f in heldout], add_special_tokens=False)]
    encoder = BackgroundEncoder(tok, train_files, int(args.chunk_mb * 1e6), args.fim_rate, args.fim_piece_chars,
                                args.cut_every_chars, args.seed)
    encoder.start()
    log(f"encoding {len(train_files)} training files in {len(encoder.chunks)} chunks in the background")

    V = tok.get_vocab_size()
    shapes = {"main": LlamaShape(V, args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate,
                                 args.seq_len),
              "draft": LlamaShape(V, args.draft_hidden, args.draft_layers, args.draft_heads, args.draft_kv_heads,
                                  args.draft_intermediate, args.seq_len)}
    torch.backends.cuda.matmul.allow_tf32 = True
    trainees = [make_trainee(name, shape, args.lr if name == "main" else args.draft_lr, device, not args.no_compile)
                for name, shape in shapes.items()]
    for tr in trainees:
        log(f"{tr.name}: {asdict(tr.model.shape)} params {tr.model.num_params():,}")
    stream = PackedStream(int(corpus["train_bytes"] / 2.5), device, args.seed)
    stream.pull(encoder, min_size=(args.seq_len + 1) * args.batch_size)
    log(f"first chunks: {stream.size / 1e6:.1f}M tokens")

    t = time.time()
    steps, curve, timings["compile_s"] = train(trainees, stream, encoder, args, T0 + args.budget_s - args.reserve_s,
                                               device)
    timings["train_s"] = time.time() - t
    tokens_seen = steps * args.batch_size * args.seq_len
    encoder.join()  # normally long done; export below flips the tokenizer's encode_special_tokens
    stream.pull(encoder, wait_all=True)
    corpus.update(train_tokens=stream.size, fim_files=encoder.num_fim,
                  train_bytes_per_token=corpus["train_bytes"] / stream.size)
    timings["encode_s"] = encoder.seconds
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    log(f"training done: {steps} steps, {tokens_seen / 1e6:.1f}M tokens, {timings['train_s']:.1f}s, "
        f"peak GPU memory {peak_gib:.1f} GiB")

    t = time.time()
    evals = {tr.name: evaluate(tr.model, heldout_docs, heldout_bytes, args.seq_len, device) for tr in trainees}
    xz = xz_async.get()
    xz_pool.close()
    xz_bpb = sum(xz) / sum(heldout_bytes)
    timings["eval_s"] = time.time() - t
    log(f"held-out: main {evals['main']['bits_per_byte']:.4f} bpb, draft {evals['draft']['bits_per_byte']:.4f} bpb, "
        f"xz -9e {xz_bpb:.4f} bpb ({timings['eval_s']:.1f}s)")

    t = time.time()
    export_root = Path(tempfile.mkdtemp(prefix="tandem_export_"))  # only tarballs go under --out
    model_dirs = {"default_model": export_root / "default_model", "draft_model": export_root / "draft_model"}
    verify = {}
    longest = max(range(len(heldout)), key=lambda i: heldout[i].num_bytes)
    for tr, (arc, d) in zip(trainees, model_dirs.items()):
        export_hf(tr.model, d, tok, eot_id=0)
        verify[arc] = verify_export(tr.model, d, heldout_docs[longest], heldout[longest].text, device)
        log(f"export {arc}: {verify[arc]}; " + ", ".join(f"{p.name} {p.stat().st_size}" for p in sorted(d.iterdir())))
    parts = tar_dir_parts(model_dirs, out, "models.tar", 15_900_000)
    manifest = [{"name": heldout[i].name, "index": i, "bytes": heldout[i].num_bytes, "sha256": heldout[i].sha256,
                 "tokens": len(heldout_docs[i]) - 1, "xz_bits": xz[i],
                 "main_bits": evals["main"]["per_file_bits"][i], "draft_bits": evals["draft"]["per_file_bits"][i]}
                for i in pick_bench_files(heldout, args.bench_files, args.bench_max_bytes, args.seed)]
    write_bench_tar(out / "heldout_python.tar.gz", heldout, manifest)
    timings["export_s"] = time.time() - t

    bench_bytes = sum(m["bytes"] for m in manifest)
    metrics = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "python": sysconfig.get_python_version(),
        "params_main": trainees[0].model.num_params(), "params_draft": trainees[1].model.num_params(),
        "shapes": {k: asdict(v) for k, v in shapes.items()},
        "special_token_ids": {s: tok.token_to_id(s) for s in SPECIAL_TOKENS},
        "steps": steps, "tokens_seen": tokens_seen, "epochs": tokens_seen / stream.size,
        "train_time_s": round(timings["train_s"], 1), "peak_gpu_gib": round(peak_gib, 1),
        **{f"heldout_{k}_{name}": e[k] for name, e in evals.items() for k in ("loss", "bits_per_byte", "tokens")},
        "xz_bits_per_byte": xz_bpb, "ratio_main_over_xz": evals["main"]["bits_per_byte"] / xz_bpb,
        "acceptance_main_le_0.6_xz": evals["main"]["bits_per_byte"] <= 0.6 * xz_bpb,
        "bench_files": len(manifest), "bench_bytes": bench_bytes,
        **{f"bench_bits_per_byte_{k}": sum(m[f"{k}_bits"] for m in manifest) / bench_bytes
           for k in ("main", "draft", "xz")},
        "verify": verify, "corpus": corpus, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "model_parts": parts, "args": vars(args), "total_time_s": round(time.time() - T0, 1),
    }
    (out / "loss_curve.json").write_text(json.dumps(curve) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    main()
