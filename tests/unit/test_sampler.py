"""The batched sampler: sampled frequencies match the intended distribution (chi-square),
seeded rows are reproducible whatever else is in the batch, penalties and bans."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from tandem.runner.sampler import row_seed, Sampler, SamplingTensors

VOCAB = 8
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def _tensors(n: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None,
             max_logprobs=-1, **extra) -> SamplingTensors:
    full = lambda v, dt=torch.float32: torch.full((n,), v, dtype=dt)  # noqa: E731
    return SamplingTensors(
        temperature=full(temperature), top_k=full(top_k or VOCAB, torch.int64),
        top_p=full(top_p), min_p=full(min_p),
        repetition_penalty=full(extra.get("rep", 1.0)),
        presence_penalty=full(extra.get("presence", 0.0)),
        frequency_penalty=full(extra.get("frequency", 0.0)),
        output_tokens=extra.get("output_tokens"), prompt_tokens=extra.get("prompt_tokens"),
        banned_tokens=extra.get("banned"), seeds=seeds or [None] * n,
        all_greedy=temperature == 0.0, any_top_k=0 < top_k < VOCAB, any_top_p=top_p < 1.0,
        any_min_p=min_p > 0.0, max_logprobs=max_logprobs,
        bias_tokens=extra.get("bias_tokens"), bias_values=extra.get("bias_values"),
        allowed_tokens=extra.get("allowed_tokens"), allowed_rows=extra.get("allowed_rows"))


def _intended(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """The distribution each setting means, the slow obvious way: filters apply in turn
    (min-p, top-k, top-p), each on the renormalized survivors of the one before."""
    p = (LOGITS / temperature).softmax(-1)
    if min_p:
        p = torch.where(p >= min_p * p.max(), p, torch.zeros_like(p))
        p = p / p.sum()
    order = p.argsort(descending=True).tolist()
    if top_k:
        p[order[top_k:]] = 0.0
        p = p / p.sum()
    if top_p < 1.0:
        mass = 0.0
        for rank, tok in enumerate(order):
            if mass >= top_p:  # the smallest prefix whose mass reaches top_p
                p[order[rank:]] = 0.0
                break
            mass += p[tok].item()
        p = p / p.sum()
    return p


@pytest.mark.parametrize("setting", [
    {"temperature": 1.0}, {"temperature": 0.5}, {"temperature": 2.0}, {"top_k": 3},
    {"top_p": 0.7}, {"top_p": 0.9, "temperature": 0.8}, {"min_p": 0.2},
    {"top_k": 5, "top_p": 0.8, "min_p": 0.05},
])
def test_sampled_frequencies_match_distribution(setting):
    torch.manual_seed(0)
    n = 40_000
    out = Sampler(VOCAB)(LOGITS.expand(n, VOCAB).clone(), _tensors(n, **setting))
    counts = torch.bincount(out.token_ids, minlength=VOCAB).double()
    expected = _intended(**setting).double() * n
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token outside top-k/top-p/min-p"
    exp = expected[support].numpy()
    _, pvalue = chisquare(counts[support].numpy(), exp * n / exp.sum())
    assert pvalue > 1e-3, (setting, counts, expected)


def test_greedy_is_argmax_and_temperature_zero_rows_mix():
    logits = torch.randn(6, VOCAB)
    t = _tensors(6, temperature=0.0)
    assert Sampler(VOCAB)(logits, t).token_ids.tolist() == logits.argmax(-1).tolist()
    temps = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    mixed = SamplingTensors(**{**{f: getattr(t, f) for f in t.__slots__},
                               "temperature": temps, "all_greedy": False})
    toks = Sampler(VOCAB)(logits, mixed).token_ids
    assert toks[::2].tolist() == logits[::2].argmax(-1).tolist()


def test_seeded_rows_do_not_depend_on_the_batch():
    """A seeded row's draw is a function of (seed, position) only: neither the batch nor
    the other rows, nor how many steps drew before, change it."""
    def draw(batch: int, row: int, positions) -> list[int]:
        out = []
        for pos in positions:
            seeds = [None] * batch
            seeds[row] = row_seed(1234, pos)
            logits = torch.randn(batch, VOCAB)  # other rows change freely
            logits[row] = LOGITS
            out.append(int(Sampler(VOCAB)(logits, _tensors(batch, seeds=seeds)).token_ids[row]))
        return out

    alone = draw(1, 0, range(20))
    assert draw(7, 3, range(20)) == alone and draw(32, 31, range(20)) == alone
    assert draw(4, 2, range(10, 20)) == alone[10:]  # a later start: same draws there
    assert len(set(alone)) > 1  # really sampled, not greedy
    assert row_seed(1234, 5) != row_seed(1234, 6) != row_seed(1235, 6)


def test_penalties_match_reference():
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.0, 1.0, -1.0, 2.0]])
    out_toks = torch.tensor([[3, 3, 1, VOCAB]])  # VOCAB is padding
    prompt = torch.tensor([[5, VOCAB]])
    t = _tensors(1, temperature=0.0, rep=2.0, presence=0.5, frequency=0.25,
                 output_tokens=out_toks, prompt_tokens=prompt, max_logprobs=0)
    from tandem.runner.sampler import apply_penalties
    got = apply_penalties(logits.clone(), t)[0]
    ref = logits[0].clone()
    for tok, count in ((3, 2), (1, 1)):
        ref[tok] = ref[tok] / 2.0 if ref[tok] > 0 else ref[tok] * 2.0
        ref[tok] -= 0.25 * count + 0.5
    ref[5] = ref[5] / 2.0  # seen in the prompt: repetition penalty only
    assert torch.allclose(got, ref)


def test_banned_tokens_never_sampled_and_logprobs_are_raw():
    torch.manual_seed(0)
    n = 2000
    banned = torch.tensor([[0, 1, VOCAB]] * n)
    out = Sampler(VOCAB)(LOGITS.expand(n, VOCAB).clone(),
                         _tensors(n, banned=banned, max_logprobs=2))
    assert not ((out.token_ids == 0) | (out.token_ids == 1)).any()
    raw = LOGITS.log_softmax(-1)
    # Column 0: the sampled token's logprob; then the top-2 of the unprocessed distribution.
    assert torch.allclose(out.logprobs[:, 0], raw[out.token_ids])
    assert out.logprob_token_ids[0, 1:].tolist() == [0, 1]
    assert math.isclose(out.logprobs[0, 1].item(), raw[0].item(), rel_tol=1e-6)


def test_logit_bias_shifts_the_distribution_and_logprobs_stay_raw():
    # row 0: +2 on token 3 and -100 on token 0 (the argmax); row 1: no bias (padding)
    tokens = torch.tensor([[3, 0], [VOCAB, VOCAB]])
    values = torch.tensor([[2.0, -100.0], [0.0, 0.0]])
    out = Sampler(VOCAB)(LOGITS.expand(2, VOCAB).clone(),
                         _tensors(2, temperature=0.0, max_logprobs=1, bias_tokens=tokens,
                                  bias_values=values))
    assert out.token_ids.tolist() == [3, 0]  # 0.5 + 2 beats 1.5 once token 0 is out
    raw = LOGITS.log_softmax(-1)
    assert torch.allclose(out.logprobs[:, 0], raw[out.token_ids])
    # sampled rows: the biased distribution, by frequency
    torch.manual_seed(0)
    n = 20000
    biased = LOGITS.clone()
    biased[7] += 5.0
    out = Sampler(VOCAB)(LOGITS.expand(n, VOCAB).clone(),
                         _tensors(n, bias_tokens=torch.tensor([[7]] * n),
                                  bias_values=torch.tensor([[5.0]] * n)))
    counts = torch.bincount(out.token_ids, minlength=VOCAB).float()
    expected = biased.softmax(-1) * n
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-4


def test_allowed_token_ids_mask_the_rest():
    # row 0 may only pick 5 or 6; row 1 has no list (padding only) and is left alone
    allowed = torch.tensor([[5, 6], [VOCAB, VOCAB]])
    rows = torch.tensor([True, False])
    out = Sampler(VOCAB)(LOGITS.expand(2, VOCAB).clone(),
                         _tensors(2, temperature=0.0, allowed_tokens=allowed, allowed_rows=rows))
    assert out.token_ids.tolist() == [5, 0]
    torch.manual_seed(0)
    n = 4000
    out = Sampler(VOCAB)(LOGITS.expand(n, VOCAB).clone(),
                         _tensors(n, allowed_tokens=torch.tensor([[5, 6]] * n),
                                  allowed_rows=torch.ones(n, dtype=torch.bool)))
    assert set(out.token_ids.tolist()) == {5, 6}
