"""Turn a `StepPlan` into device tensors: model inputs, attention metadata, sampling rows.

Built with plain Python lists and moved to the device in one copy per tensor; nothing here
depends on the model. Row layout of the flattened step:

    rows        | seq0 chunk (start..end) | seq1 (1 token) | ...
    logits rows   last row of every seq that samples, then (if asked) prompt-logprob rows

A decode whose input token the previous step is still sampling (async scheduling) gets a
placeholder id; `inflight_rows` and `inflight_src` say which rows the runner fills from
the previous step's device output, and from which of its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.layers.attention_metadata import AttentionMetadata
from tandem.outputs import StepPlan
from tandem.runner.request_state import RequestState
from tandem.runner.sampler import SamplingTensors, row_seed


@dataclass(frozen=True, slots=True)
class ModelInputs:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    attn_metadata: AttentionMetadata
    sample_rows: list[int]  # plan.seqs indices that sample, in logits-row order
    logits_indices: torch.Tensor  # (S + P,) rows of hidden states to project to logits
    prompt_lp_spans: list[tuple[int, int, int]]  # (seq index, first logits row, count)
    inflight_rows: torch.Tensor | None = None  # (I,) rows whose input id is in flight
    inflight_src: torch.Tensor | None = None  # (I,) their rows in the previous step's output
    # rows of logits per sampling seq (aligned with sample_rows): 1, or 1 + its drafts
    sample_counts: list[int] | None = None


# Steps of at most this many tokens (every decode-only step up to 256 sequences) compute
# positions and cache slots on the host and ship them with the step's one int64 copy: a
# decode step then launches ~10 fewer kernels; longer steps compute them on the device.
HOST_POSITIONS_MAX = 256


def _to(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def build_model_inputs(plan: StepPlan, states: dict[str, RequestState], block_size: int,
                       device: torch.device, inflight_src: dict[str, int] | None = None
                       ) -> ModelInputs:
    """states: the runner's per-request state, with `plan` applied; inflight_src: request
    id -> row of the previous step's sampled ids (async)."""
    ids: list[int] = []
    dst: list[int] = []
    src: list[int] = []
    starts: list[int] = []
    query_start = [0]
    seq_lens: list[int] = []
    query_lens: list[int] = []
    sample_rows: list[int] = []
    sample_counts: list[int] = []
    sample_idx: list[int] = []
    prompt_rows: list[int] = []
    spans: list[tuple[int, int, int]] = []
    tables_of: list[list[int]] = []
    for i, seq in enumerate(plan.seqs):
        req, start, end = states[seq.request_id], seq.start_pos, seq.end_pos
        row0 = query_start[-1]
        if seq.inflight_input:  # only decodes: the token sampled by the previous step
            assert seq.num_new_tokens == 1 and inflight_src is not None
            ids.append(0)
            dst.append(row0)
            src.append(inflight_src[seq.request_id])
        elif seq.num_new_tokens == 1:
            ids.append(req.token_ids[start])
        elif seq.spec_token_ids:  # known tokens, then the drafts to verify
            ids.extend(req.token_ids[start:end - len(seq.spec_token_ids)])
            ids.extend(seq.spec_token_ids)
        else:
            ids.extend(req.token_ids[start:end])
        if seq.spec_token_ids:
            # Each verified row attends as its own one-token query over the positions up to
            # it: every backend's decode kernel (and a decode CUDA graph) runs the verify.
            for j in range(seq.num_new_tokens):
                tables_of.append(req.block_ids)
                starts.append(start + j)
                query_start.append(row0 + j + 1)
                query_lens.append(1)
                seq_lens.append(start + j + 1)
        else:
            tables_of.append(req.block_ids)
            starts.append(start)
            query_start.append(row0 + seq.num_new_tokens)
            query_lens.append(seq.num_new_tokens)
            seq_lens.append(end)
        if seq.sample:  # the last row, and with drafts the row before each of them
            sample_rows.append(i)
            count = 1 + len(seq.spec_token_ids)
            sample_counts.append(count)
            sample_idx.extend(range(row0 + seq.num_new_tokens - count,
                                    row0 + seq.num_new_tokens))
        if req.params.prompt_logprobs is not None:
            # Row p predicts prompt token p + 1; only rows before the last prompt token count.
            last = min(end, req.num_prompt_tokens - 1)
            if last > start:
                spans.append((i, len(prompt_rows), last - start))
                prompt_rows.extend(range(row0, row0 + last - start))
    max_blocks = max((len(t) for t in tables_of), default=1)
    tables = [b for t in tables_of for b in t + [0] * (max_blocks - len(t))]
    n = len(sample_idx)
    spans = [(i, n + r, c) for i, r, c in spans]  # prompt rows follow the sampled rows
    # Two host-to-device copies per step: every int64 array in one, every int32 in another.
    t = len(ids)
    num_seqs = len(starts)  # attention sequences: a verifying seq counts once a row
    num_lp = len(prompt_rows)
    host = t <= HOST_POSITIONS_MAX
    extra: list[int] = []
    if host:  # positions, then slots: a few Python ops a token, no kernels
        for start, qlen in zip(starts, query_lens):
            extra += range(start, start + qlen)
        extra += [tables_of[i][p // block_size] * block_size + p % block_size
                  for i, (start, qlen) in enumerate(zip(starts, query_lens))
                  for p in range(start, start + qlen)]
    longs = _to(ids + starts + sample_idx + prompt_rows + dst + src + extra, torch.int64,
                device)
    # Each int32 array starts 16-byte aligned: Triton specializes kernels on pointer
    # alignment, and an offset that moved with the batch size would compile new variants
    # mid-run.
    parts = [query_start, seq_lens, query_lens]
    offsets = []
    packed: list[int] = []
    for part in parts:
        offsets.append(len(packed))
        packed += part + [0] * (-len(part) % 4)
    ints = _to(packed + tables, torch.int32, device)
    query_start_loc = ints[:num_seqs + 1]
    lens_t = ints[offsets[1]:offsets[1] + num_seqs]
    qlens_t = ints[offsets[2]:offsets[2] + num_seqs]
    block_tables = ints[len(packed):].view(num_seqs, max_blocks)
    tail = t + num_seqs + n + num_lp
    if host:
        end = tail + 2 * len(dst)
        positions, slots = longs[end:end + t], longs[end + t:end + 2 * t]
    else:
        # Each token's position and cache slot, computed on the device from its sequence's
        # start and block table (no per-token Python):
        #   seq_of[r] = the sequence of row r;  pos = start[seq] + (r - query_start[seq])
        #   slot = block_tables[seq, pos // block_size] * block_size + pos % block_size
        seq_of = torch.repeat_interleave(torch.arange(num_seqs, device=device),
                                         qlens_t, output_size=t)
        rows = torch.arange(t, device=device)
        positions = longs[t:t + num_seqs][seq_of] + rows - query_start_loc[seq_of]
        slots = (block_tables[seq_of, positions // block_size].long() * block_size
                 + positions % block_size)
    meta = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=query_start_loc,
        seq_lens=lens_t,
        block_tables=block_tables,
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens, default=0), max_seq_len=max(seq_lens, default=0),
        block_size=block_size, decode_rows_distinct=num_seqs == len(plan.seqs))
    return ModelInputs(longs[:t], positions, meta, sample_rows, longs[t + num_seqs:tail], spans,
                       longs[tail:tail + len(dst)] if dst else None,
                       longs[tail + len(dst):tail + 2 * len(dst)] if dst else None,
                       sample_counts)


def _padded(rows: list[list], pad: int | float, device: torch.device,
            dtype: torch.dtype = torch.int64) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return _to([r + [pad] * (width - len(r)) for r in rows], dtype, device)


def _banned(r: RequestState, pos: int) -> list[int]:
    """Token ids the row sampling position `pos` may not take: EOS and stop tokens before
    min_tokens, and bad_words' (from the outputs before pos)."""
    p = r.params
    early = pos - r.num_prompt_tokens < p.min_tokens
    if not early and not p.bad_words_token_ids:
        return []  # most rows
    ban = set(r.eos_token_ids) | set(p.stop_token_ids) if early else set()
    if p.bad_words_token_ids:
        ban.update(p.bad_word_bans(r.output_token_ids))
    return sorted(ban)


def build_sampling_tensors(plan: StepPlan, states: dict[str, RequestState],
                           sample_rows: list[int], vocab_size: int, device: torch.device,
                           sample_counts: list[int] | None = None) -> SamplingTensors | None:
    """The sampling tensors of the logits rows: sample_counts[j] rows for seq sample_rows[j]
    (default 1), sampling the tokens at positions end_pos - count + 1 .. end_pos. None when
    every row is plain greedy (temperature 0, no logprobs, penalties, logit_bias,
    allowed_token_ids or min_tokens bans pending): the sampler then needs only an argmax,
    and the step no copy or kernel for parameters it would not read."""
    counts = sample_counts or [1] * len(sample_rows)
    # a seq's earliest sampled row is at end_pos - c + 1
    if all(states[plan.seqs[i].request_id].greedy_at(plan.seqs[i].end_pos - c + 1)
           for i, c in zip(sample_rows, counts)):
        return None
    seqs = [plan.seqs[i] for i, c in zip(sample_rows, counts) for _ in range(c)]
    positions = [plan.seqs[i].end_pos - c + 1 + j for i, c in zip(sample_rows, counts)
                 for j in range(c)]
    reqs = [states[s.request_id] for s in seqs]
    params = [r.params for r in reqs]
    f32 = torch.float32
    penalize = any(p.has_penalties for p in params)
    repetition = any(p.repetition_penalty != 1.0 for p in params)
    bad_words = any(p.bad_words_token_ids for p in params)
    if (penalize or bad_words) and any(p.reads_output_tokens and s.inflight_input
                                       for p, s in zip(params, seqs)):
        raise RuntimeError("penalties and bad_words need every earlier token on the host")
    banned = [_banned(r, pos) for pos, r in zip(positions, reqs)]
    asked = [p.logprobs for p in params if p.logprobs is not None]
    biased = any(p.logit_bias for p in params)
    restricted = any(p.allowed_token_ids is not None for p in params)
    # One host-to-device copy for all per-row floats: (N, 7) -> 7 rows.
    table = _to([r.sampling_row for r in reqs], f32, device).t()
    top_k = table[1].long()
    top_k = torch.where((top_k > 0) & (top_k < vocab_size), top_k, vocab_size)
    return SamplingTensors(
        temperature=table[0], top_k=top_k, top_p=table[2], min_p=table[3],
        repetition_penalty=table[4], presence_penalty=table[5], frequency_penalty=table[6],
        output_tokens=_padded([r.output_token_ids for r in reqs], vocab_size, device)
        if penalize else None,
        prompt_tokens=_padded([r.prompt_token_ids for r in reqs], vocab_size, device)
        if repetition else None,
        banned_tokens=_padded(banned, vocab_size, device) if any(banned) else None,
        bias_tokens=_padded([list(p.logit_bias) for p in params], vocab_size, device)
        if biased else None,
        bias_values=_padded([list(p.logit_bias.values()) for p in params], 0.0, device, f32)
        if biased else None,
        # a row without a list: padding only, and allowed_rows False (nothing masked)
        allowed_tokens=_padded([p.allowed_token_ids or [] for p in params], vocab_size, device)
        if restricted else None,
        allowed_rows=_to([p.allowed_token_ids is not None for p in params], torch.bool, device)
        if restricted else None,
        seeds=[row_seed(p.seed, pos) if p.seed is not None else None
               for pos, p in zip(positions, params)],
        all_greedy=all(p.temperature == 0.0 for p in params),
        any_top_k=any(0 < p.top_k < vocab_size for p in params),
        any_top_p=any(p.top_p < 1.0 for p in params),
        any_min_p=any(p.min_p > 0.0 for p in params),
        max_logprobs=max(asked, default=-1),
    )
