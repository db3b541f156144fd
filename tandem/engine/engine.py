"""`Engine`: the in-process core. `step()` is schedule, execute, update; nothing else.

    add_request: tokenize + validate (InputProcessor) -> n x Request -> Scheduler.add_request
    step:        Scheduler.schedule -> StepPlan -> ModelRunner.execute -> StepResult
                 -> Scheduler.update (tokens, finishes, block caching)
                 -> OutputProcessor.process (detokenize, stop strings) -> RequestOutput

With async scheduling (on for CUDA) a step runs one plan ahead of the device:

    step k:  schedule N+1 -> launch N+1 (queued behind N) -> collect N -> update N -> outputs N

so scheduling, input building, detokenization and output handling of one step happen
while the device computes the next. Where a request's next step needs its previous token
on the host (repetition/presence/frequency penalties), the engine collects first.

Fault isolation: `validate` rejects what cannot run before it is queued, but if executing
a plan still raises, the plan's sequences are run again in halves (synchronously) until
each failing one is alone; only those requests end, with finish_reason "error", and every
other sequence gets exactly the step it was planned for.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from tandem.config import EngineConfig
from tandem.engine.input_processor import InputProcessor, PromptType
from tandem.engine.output_processor import OutputProcessor
from tandem.engine.stats import EngineStats, split_step_tokens
from tandem.executor import Executor, ExecutorDead
from tandem.outputs import RequestOutput, StepPlan, StepResult
from tandem.request import FinishReason, Request, SamplingParams
from tandem.scheduler import Scheduler
from tandem.spec_decode.switch import SpecSwitch, StepCosts

logger = logging.getLogger(__name__)

class Engine:
    def __init__(self, config: EngineConfig) -> None:
        # Tokenizer, limits, validation and sampling defaults: what a front end in another
        # process needs too, without the model.
        self.inputs = InputProcessor(config)
        config = self.config = self.inputs.config  # max_model_len resolved
        model_dir = config.model.model
        self.tokenizer = self.inputs.tokenizer
        if self.inputs.sampling_defaults:
            logger.info("sampling defaults from generation_config: %s",
                        self.inputs.sampling_defaults)
        # The model runner(s): in this process, or one worker process per tensor-parallel rank.
        self.executor = Executor.create(config)
        self.vocab_size = self.inputs.vocab_size
        num_blocks = self.executor.num_blocks
        capacity = num_blocks * config.cache.block_size
        if config.model.max_model_len > capacity:
            self.executor.shutdown()
            raise ValueError(
                f"max_model_len={config.model.max_model_len} does not fit in the KV cache: "
                f"{num_blocks} blocks x block_size {config.cache.block_size} = {capacity} tokens "
                f"({self.executor.block_bytes * num_blocks / 2**30:.2f} GiB). Lower max_model_len "
                f"or give the cache more memory (num_kv_blocks, gpu_memory_utilization, "
                f"cpu_kv_cache_gib)")
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks)
        spec = config.scheduler.speculative_config
        if spec is not None:
            costs = self.executor.spec_costs
            self.scheduler.spec_switch = SpecSwitch(
                spec.num_speculative_tokens,
                StepCosts({int(r): t for r, t in costs.get("verify", {}).items()},
                          {int(r): t for r, t in costs.get("draft", {}).items()})
                if spec.auto_switch else None)
        self._host_s = 0.0  # host work (schedule, update) of the async step under way
        self.kv_receiver = None  # a decode engine's disagg.receiver.KVReceiver
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler.finish_request)
        self.eos_token_ids = self.inputs.eos_token_ids  # what new requests stop on
        asked = config.scheduler.async_scheduling
        self.async_scheduling = self.executor.device.type == "cuda" if asked is None else asked
        spec = config.scheduler.speculative_config
        if spec is not None and spec.synthetic_acceptance_rate is not None:
            from tandem import spec_decode
            if not spec_decode.SYNTHETIC_ALLOWED:
                raise ValueError("speculative_config.synthetic_acceptance_rate is for "
                                 "`tandem bench` only: its outputs are not the model's")
        self._inflight: tuple[StepPlan, Any] | None = None  # launched, not collected (async)
        self._step = 0
        self._last_split = (0, 0)
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._spec_drafted = self._spec_accepted = self._spec_steps = 0
        self._spec_per_position: list[int] = []
        logger.info("engine ready: %s, %s on %s (tensor parallel %d), KV cache %d blocks x %d "
                    "= %d tokens", model_dir, self.executor.dtype, self.executor.device,
                    config.parallel.tensor_parallel_size, num_blocks, config.cache.block_size,
                    capacity)

    @property
    def runner(self) -> Any:
        """The in-process model runner (None when the ranks run in worker processes)."""
        return self.executor.runner

    def describe(self) -> dict[str, Any]:
        """What the engine is (for start-up logs and the server's ready message)."""
        e = self.executor
        return {"dtype": str(e.dtype).split(".")[-1], "device": str(e.device),
                "num_kv_blocks": e.num_blocks, "block_size": self.config.cache.block_size,
                "tensor_parallel_size": self.config.parallel.tensor_parallel_size}

    def shutdown(self) -> None:
        """Stop the executor's workers (if any); the engine cannot step afterwards."""
        self.executor.shutdown()

    @property
    def max_model_len(self) -> int:
        return self.config.model.max_model_len

    # ---- requests (tokenizing and validation: self.inputs, an InputProcessor) ----------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None, awaiting_kv: bool = False) -> None:
        """Validate and queue; raises ValueError (naming the field) and changes nothing.
        awaiting_kv: its prompt's KV comes from a prefill engine (disagg/receiver.py)."""
        if awaiting_kv and (self.kv_receiver is None or params.n != 1):
            raise ValueError("awaiting_kv needs a kv_receiver and n == 1")
        text, token_ids = self.inputs.tokenize_prompt(prompt)
        self.inputs.validate(token_ids, params)
        arrival = arrival_time if arrival_time is not None else time.time()
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:  # each sample is its own request; seeds differ per sample
                seed = None if params.seed is None else (params.seed + i) % 2**63
                child_params = dataclasses.replace(params, n=1, seed=seed)
            rid = request_id if params.n == 1 else f"{i}_{request_id}"
            children.append(Request(rid, token_ids, child_params, self.eos_token_ids, arrival))
        live = [r.request_id for r in children if r.request_id in self.outputs.child_to_parent]
        if request_id in self.outputs.parents or live:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.outputs.add(request_id, text, children)
        added: list[str] = []
        try:
            for r in children:
                self.scheduler.add_request(r, awaiting_kv)
                added.append(r.request_id)
        except ValueError:  # undo, so a refused request leaves no trace
            self.scheduler.abort_requests(added)
            self.outputs.remove(request_id)
            raise

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort a user request (all n samples); its KV blocks are free on return."""
        parent = self.outputs.parents.get(request_id)
        if parent is None:
            return None
        self.scheduler.abort_requests([c.request.request_id for c in parent.children])
        return self.outputs.aborted_output(request_id)

    def has_unfinished_requests(self) -> bool:
        # An in-flight step's requests are live until its update finishes them, so a step
        # left in flight here only holds requests finished meanwhile (aborted): nothing
        # to deliver; the next step collects it.
        return self.scheduler.has_unfinished_requests()

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.kv_receiver is not None:  # disaggregation: KV that arrived joins the queue
            self.kv_receiver.poll(self)
        if not self.async_scheduling:
            t0 = time.perf_counter()
            plan = self.scheduler.schedule()
            try:
                result = self.executor.execute(plan)
            except ExecutorDead:
                raise
            except Exception as e:
                return self._isolate_failure(plan, e)
            outputs = self._finish_step(plan, result)
            if self.scheduler.spec_switch is not None and not plan.is_empty:
                self.scheduler.spec_switch.step_time(time.perf_counter() - t0)
            return outputs
        outputs: list[RequestOutput] = []
        if self._inflight is not None and self._needs_host_tokens(self._inflight[0]):
            outputs = self._collect()
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        self._host_s += time.perf_counter() - t0
        try:
            launched = self.executor.launch(plan)
        except ExecutorDead:
            raise
        except Exception as e:  # settle the step in flight, then isolate synchronously
            if self._inflight is not None:
                outputs += self._collect()
            return outputs + self._isolate_failure(plan, e)
        if self._inflight is not None:
            outputs += self._collect()
        self._inflight = (plan, launched)
        if self.scheduler.spec_switch is not None:  # what a step that proposes cannot hide
            self.scheduler.spec_switch.host_time(self._host_s)
        self._host_s = 0.0
        return outputs

    def _isolate_failure(self, plan: StepPlan, error: Exception) -> list[RequestOutput]:
        """Executing `plan` raised `error`. Run its sequences again in halves until every
        failing one is alone, and end just those requests with ERROR.

        A retry recomputes the same tokens into the same cache slots (blocks are only
        registered for reuse once a step that computed them is updated), each retry reads
        its inputs from the host (the failed step's device outputs are gone), and seeded
        requests draw by (seed, position), so every surviving
        sequence gets the tokens the failed step would have given it."""
        logger.error("step failed (%r); isolating the failing request(s) among %d",
                     error, len(plan.seqs))
        outputs: list[RequestOutput] = []
        failing: list[Request] = []
        groups = [list(range(len(plan.seqs)))]
        while groups:
            group = groups.pop(0)
            # (Async: a sequence whose request the step in flight finished is dropped.)
            sub = self.scheduler.retry_plan(plan, group)
            if sub.is_empty:
                self.scheduler.discard(sub)
                continue
            try:
                result = self.executor.execute(sub)
            except ExecutorDead:
                raise
            except Exception as e:
                self.scheduler.discard(sub)
                if len(group) > 1:
                    groups += [group[:len(group) // 2], group[len(group) // 2:]]
                    continue
                request = self.scheduler.requests_of(plan)[group[0]]
                logger.error("request %s failed in the engine: %r", request.request_id, e,
                             exc_info=e)
                failing.append(request)
                continue
            outputs += self._finish_step(sub, result)
        self.scheduler.discard(plan)
        for request in failing:
            if not request.is_finished:
                self.scheduler.finish_request(request.request_id, FinishReason.ERROR)
        return outputs + self.outputs.outputs_of(failing, arrived=False)

    def _collect(self) -> list[RequestOutput]:
        (plan, launched), self._inflight = self._inflight, None
        result = self.executor.collect(launched)
        t0 = time.perf_counter()
        outputs = self._finish_step(plan, result)
        self._host_s += time.perf_counter() - t0
        return outputs

    def _finish_step(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        requests = self.scheduler.requests_of(plan)
        self._account(plan, requests, result)
        updated = self.scheduler.update(plan, result)
        return self.outputs.process(plan, result, updated)

    def _needs_host_tokens(self, plan: StepPlan) -> bool:
        """Whether a request sampled in `plan` needs that token on the host to plan its
        next step: penalties (and bad words of several tokens) read earlier output tokens,
        and drafts proposed after
        `plan` (speculative decoding) are verified by the next step. So a speculating
        engine runs a step at a time, and one whose switch has turned speculation off
        pipelines its steps again. A step that verifies drafts is collected too: how many
        of its tokens count (and so where each request stands) is known only then."""
        return plan.num_spec_tokens > 0 or any(
            s.spec_token_ids or (s.sample and r.sampling_params.reads_output_tokens)
            for s, r in zip(plan.seqs, self.scheduler.requests_of(plan)))

    def _account(self, plan: StepPlan, requests: list[Request], result: StepResult) -> None:
        """Count a step before its update (requests: the plan's, aligned with its seqs)."""
        self._step += 1
        self._last_split = split_step_tokens(plan, requests)
        for seq, r, tokens in zip(plan.seqs, requests, result.sampled_token_ids):
            self._generation_tokens += len(tokens)
            # A request's first token happens once (a recompute after preemption samples
            # later tokens), so this counts each prompt once.
            if seq.sample and not r.is_finished and not r.output_token_ids:
                self._prompt_tokens += r.num_prompt_tokens
            if seq.spec_token_ids and tokens:
                accepted = len(tokens) - 1
                self._spec_drafted += len(seq.spec_token_ids)
                self._spec_accepted += accepted
                self._spec_steps += 1
                per = self._spec_per_position
                per.extend([0] * (len(seq.spec_token_ids) - len(per)))
                for j in range(accepted):
                    per[j] += 1

    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        prefill, decode = self._last_split
        return EngineStats(self._step, prefill, decode, s.num_running, s.num_waiting,
                           s.num_kv_blocks_used, s.num_kv_blocks_total, s.kv_cache_usage,
                           s.prefix_cache_queries, s.prefix_cache_hits, s.num_preemptions,
                           self._prompt_tokens, self._generation_tokens,
                           self._spec_drafted, self._spec_accepted, self._spec_steps,
                           tuple(self._spec_per_position))

