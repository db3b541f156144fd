"""The engine loop keeps the collector's full passes off the objects alive when it started,
and gives them back when it ends (nothing leaks)."""

from __future__ import annotations

import gc
import weakref

from tandem import LLM, SamplingParams
from tandem.engine.gc_heap import frozen_heap
from tests.model_factory import make_tiny_model


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_objects_alive_at_the_start_are_frozen_then_given_back():
    assert gc.get_freeze_count() == 0
    node = _Node()
    ref = weakref.ref(node)
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        with frozen_heap():  # nested (two loops in one process): one freeze
            pass
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert ref() is not None  # frozen: no pass looks at it
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None  # unfrozen when the loop ended: collected, not leaked


def test_llm_generate_steps_with_the_heap_frozen(tmp_path):
    llm = LLM(make_tiny_model(tmp_path, "LlamaForCausalLM"), max_model_len=64)
    seen = []
    step = llm.engine.step

    def counting_step():
        seen.append(gc.get_freeze_count())
        return step()

    llm.engine.step = counting_step
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert seen and min(seen) > 0
    assert gc.get_freeze_count() == 0
