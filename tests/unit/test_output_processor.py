"""OutputProcessor: a FINAL_ONLY request without stop strings is detokenized when it ends
(finished, aborted or failed), with exactly the text that feeding it step by step gives,
held-back incomplete characters included."""

from __future__ import annotations

import random

import pytest

from tandem.assets import default_model_dir
from tandem.engine.output_processor import OutputProcessor
from tandem.engine.tokenizer import Tokenizer
from tandem.request import (FinishReason, Request, RequestOutputKind, RequestStatus,
                            SamplingParams)

_TOKENIZER = Tokenizer(default_model_dir())
_TEXT = "def f(x):\n    return 'héllo wörld ✓ 日本語 🙂' * x  # naïve café\n"


def _final_text(kind: RequestOutputKind, prompt: list[int], tokens: list[int], end: str,
                per_step: int) -> tuple[str, int]:
    """The last output's text, after feeding `tokens` `per_step` at a time and ending the
    request by `end`; and how many tokens the detokenizer had seen before the end."""
    proc = OutputProcessor(_TOKENIZER, lambda rid, reason: None)
    req = Request("r", prompt, SamplingParams(max_tokens=len(tokens), output_kind=kind))
    proc.add("r", None, [req])
    child = proc.parents["r"].children[0]
    outs = []
    seen_before_end = 0
    for i in range(0, len(tokens), per_step):
        req.output_token_ids += tokens[i:i + per_step]
        if end == "finish" and i + per_step >= len(tokens):
            seen_before_end = child.num_seen
            req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.LENGTH
        outs += proc.outputs_of([req])
    if end != "finish":
        seen_before_end = child.num_seen
        req.status = RequestStatus.FINISHED
        req.finish_reason = FinishReason.ABORT if end == "abort" else FinishReason.ERROR
        outs += ([proc.aborted_output("r")] if end == "abort"
                 else proc.outputs_of([req], arrived=False))
    assert outs[-1].finished
    return outs[-1].outputs[0].text, seen_before_end


@pytest.mark.parametrize("end", ["finish", "abort", "fail"])
@pytest.mark.parametrize("per_step", [1, 3])
def test_deferred_text_equals_step_by_step(end: str, per_step: int) -> None:
    ids = _TOKENIZER.encode(_TEXT, add_special_tokens=False)
    rng = random.Random(per_step)
    cuts = sorted(rng.sample(range(1, len(ids) + 1), 12)) + [len(ids)]
    for cut in cuts:  # many cuts fall inside a multi-byte character
        prompt, tokens = ids[:3], ids[3:cut] or ids[3:4]
        deferred, seen = _final_text(RequestOutputKind.FINAL_ONLY, prompt, tokens, end,
                                     per_step)
        assert seen == 0  # nothing was detokenized before the request ended
        stepwise, _ = _final_text(RequestOutputKind.CUMULATIVE, prompt, tokens, end,
                                  per_step)
        assert deferred == stepwise, (end, cut)


def test_stop_strings_are_not_deferred() -> None:
    """With stop strings the text is matched as tokens come (the request may end early)."""
    proc = OutputProcessor(_TOKENIZER, lambda rid, reason: None)
    params = SamplingParams(max_tokens=50, stop=["zzz"],
                            output_kind=RequestOutputKind.FINAL_ONLY)
    req = Request("r", [1, 2, 3], params)
    proc.add("r", None, [req])
    req.output_token_ids += _TOKENIZER.encode("hello", add_special_tokens=False)
    proc.outputs_of([req])
    assert proc.parents["r"].children[0].num_seen == len(req.output_token_ids)
