"""The step plan as a message: msgpack round trips of everything the executor sends, and
block hashes that name the same tokens the same way in every process."""

from __future__ import annotations

import subprocess
import sys

from tandem.executor import codec
from tandem.executor.messages import (InitKVCache, LaunchStep, StepDone, WorkerFailed,
                                      config_from_dict, config_to_dict)
from tandem.config import EngineConfig
from tandem.kv_cache import hash_block_tokens
from tandem.outputs import NewRequestData, ScheduledSeq, StepPlan, StepResult
from tandem.request import RequestOutputKind, SamplingParams


def test_plan_and_result_round_trip_through_msgpack():
    params = SamplingParams(temperature=0.7, top_k=5, seed=3, stop=["\n"], logprobs=2,
                            stop_token_ids=[9], output_kind=RequestOutputKind.DELTA)
    plan = StepPlan(
        seqs=[ScheduledSeq("a", 40, 1, True, inflight_input=True, tokens_from=40,
                           new_token_ids=[], blocks_from=3, new_block_ids=[17]),
              ScheduledSeq("b", 0, 8, False, new_token_ids=[1, 2], tokens_from=8)],
        num_batched_tokens=9, new_requests=[NewRequestData("b", list(range(12)), params, [2])],
        finished_request_ids=["z"], preempted_request_ids=["y"], step_id=12, retry=True)
    back = codec.decode(codec.encode(LaunchStep(plan)))
    assert back == LaunchStep(plan)
    assert back.plan.new_requests[0].sampling_params.output_kind is RequestOutputKind.DELTA
    result = StepResult([[5, 6], []], [[{5: -0.1, 7: -2.5}, {6: -0.2}], None],
                        [None, [None, {3: -1.0}]], [[1, 2, 3], []])
    assert codec.decode(codec.encode(StepDone(0, result))) == StepDone(0, result)
    for message in (InitKVCache(10), WorkerFailed(1, "boom", True)):
        assert codec.decode(codec.encode(message)) == message


def test_engine_config_travels_as_a_dict(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    config = EngineConfig.from_kwargs(str(tmp_path), tensor_parallel_size=2, block_size=8,
                                      max_num_seqs=3, enable_prefix_caching=False)
    data = codec.decode(codec.encode(config_to_dict(config)))
    assert config_from_dict(data) == config


def test_block_hashes_are_the_same_in_every_process():
    tokens = list(range(16))
    here = hash_block_tokens(hash_block_tokens(None, tokens), tokens[::-1])
    code = ("from tandem.kv_cache import hash_block_tokens as h; t = list(range(16)); "
            "print(h(h(None, t), t[::-1]))")
    for seed in ("1", "2"):  # Python's own hash() would differ between these
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""}, check=True)
        assert int(out.stdout) == here
    assert hash_block_tokens(None, tokens) != hash_block_tokens(None, tokens[::-1])
    assert hash_block_tokens(1, tokens) != hash_block_tokens(2, tokens)
