"""The model runner: owns the model, the KV pool and the sampler; executes one `StepPlan`.

    launch:  StepPlan -> build_model_inputs -> model.forward -> compute_logits(selected rows)
             -> Sampler (sampled rows) -> copy of the sampled ids to pinned host memory
    collect: wait for that copy -> StepResult (+ log_softmax of prompt-logprob rows)

On CPU, a decode step whose rows all sample greedily without logprobs or penalties takes
a shortcut: `CpuDecodeRunner.greedy` writes its inputs in place, runs the fused step and
takes each row's argmax in the same native call, and the tokens come back as a list (no
tensor, no Sampler; the host work between two such steps is ~0.13 ms here).

`execute` is the two back to back. With async scheduling the engine launches step N+1
before collecting step N, so the host's work overlaps the device's; a decode of N+1 whose
input is N's sampled token reads it from N's device output (`inflight_input`).

It keeps its own state per request (runner/request_state.py): token ids, block table,
sampling parameters and the `torch.Generator` of a seeded request (made on its first
sampled step). Plans carry only what changed; the state goes when the plan lists the
request as finished. Under tensor parallelism every rank runs one of these on the same
plans and samples the same tokens (the logits are gathered whole on every rank and the
random streams advance alike), so any rank's result is the step's result.

Fault injection (tests of the engine's request isolation): with TANDEM_FAULT_TOKEN_ID set,
a step that samples for a request whose prompt holds that token raises `InjectedFault`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field

import torch

from tandem import envs
from tandem.config import EngineConfig
from tandem.distributed.parallel import ParallelContext
from tandem.layers.attention_metadata import AttentionMetadata
from tandem.models.loader import load_model
from tandem.quantization.compressed_tensors import checkpoint_kv_scales, quant_policy
from tandem.outputs import Logprobs, StepPlan, StepResult
from tandem.request import SamplingParams
from tandem.runner.cpu_decode import CpuDecodeRunner
from tandem.runner.cuda_graph import CudaGraphRunner
from tandem.runner.input_batch import ModelInputs, build_model_inputs, build_sampling_tensors
from tandem.runner import host_malloc
from tandem.runner.kv_memory import (allocate_kv_caches, kv_block_bytes, kv_cache_spec,
                                     num_blocks_for)
from tandem.runner.request_state import RequestState, apply_plan
from tandem.runner.sampler import Sampler
from tandem.spec_decode.verify import SyntheticAcceptance, accept_pq, accepted_length

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Launched:
    """A step on its way: its device outputs, and their host copies once `event` fires."""

    plan: StepPlan
    inputs: ModelInputs | None = None
    host: tuple[torch.Tensor, ...] = ()  # sampled token ids [, logprobs, logprob ids],
    # copied to the host (empty when the step samples nothing)
    event: torch.cuda.Event | None = None
    logits: torch.Tensor | None = None  # kept only for prompt logprobs
    # Read from the request states at launch: with async scheduling a request may finish
    # (and its state go) before its last step is collected.
    params: list[SamplingParams] = field(default_factory=list)  # aligned with plan.seqs
    prompt_targets: dict[int, list[int]] = field(default_factory=dict)  # seq index -> the
    # prompt tokens its prompt-logprob rows predict
    # speculative decoding with a sampled draft: seq index -> the draft's q rows (k, V),
    # and the target's sampling distributions of the step's sampled rows
    draft_q: dict[int, torch.Tensor] = field(default_factory=dict)
    probs: torch.Tensor | None = None
    # a step the fused CPU step sampled greedily (CpuDecodeRunner.greedy): each seq's
    # token, on the host already (the fields above stay empty)
    token_ids: list[int] | None = None


class InjectedFault(RuntimeError):
    """Raised on purpose (TANDEM_FAULT_TOKEN_ID) to test that one request's failure stays
    its own."""


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class ModelRunner:
    def __init__(self, config: EngineConfig, parallel: ParallelContext | None = None,
                 device: torch.device | None = None) -> None:
        """`parallel`: this rank's place in the tensor-parallel group (None: one rank);
        `device`: where a worker process was placed (default: `config.model.device`)."""
        self.config = config
        self.parallel = parallel or ParallelContext.single()
        self.device = device or resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        torch.manual_seed(config.model.seed)
        if self.device.type == "cuda":
            # Give back what torch caches from engines that died in this process: a segment
            # left cached would be carved up by this engine's first allocations, and one
            # long-lived tensor inside it would keep all of it (a dead engine's KV pool)
            # from the driver for good.
            torch.cuda.empty_cache()
        elif self.device.type == "cpu":
            host_malloc.tune()  # activations reuse freed heap instead of faulting in pages
        self.model = load_model(config.model.model, self.dtype, self.device,
                                config.model.load_format, config.model.seed, self.parallel,
                                quant_policy(config.model))
        self.vocab_size = self.model.vocab_size
        self.block_size = config.cache.block_size
        self.sampler = Sampler(self.vocab_size)
        self.states: dict[str, RequestState] = {}
        self.num_blocks = 0
        # A checkpoint that quantized its KV cache brings its own scales (and FP8 under
        # kv_cache_dtype auto); they win over calculate_kv_scales, as in vLLM.
        ckpt_scales = checkpoint_kv_scales(config.model, self.model.num_layers)
        self.kv_spec = kv_cache_spec(config.cache, self.model.num_layers, self.dtype,
                                     ckpt_scales)
        self.calibrate_kv_scales = config.cache.calculate_kv_scales and ckpt_scales is None
        fp8_cache = any(s.dtype == torch.float8_e4m3fn for s in self.kv_spec)
        if ckpt_scales is not None and fp8_cache:
            logger.info("FP8 KV cache with the checkpoint's scales (kv_cache_scheme)%s",
                        "; calculate_kv_scales ignored" if config.cache.calculate_kv_scales
                        else "")
        elif ckpt_scales is not None:
            logger.info("KV cache kept in %s (kv_cache_dtype=%s): the checkpoint's "
                        "kv_cache_scheme scales are not used", self.dtype,
                        config.cache.kv_cache_dtype)
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: CudaGraphRunner | None = None
        self.cpu_decode: CpuDecodeRunner | None = None  # small decode steps in one C call
        # The last launched step's sampled ids on the device (a list from the greedy fused
        # CPU step), and each request's row there.
        self._last_ids: torch.Tensor | list[int] | None = None
        self._last_rows: dict[str, int] = {}
        self.fault_token_id = envs.fault_token_id()
        spec = config.scheduler.speculative_config
        self.proposer = None
        self.num_spec_tokens = 0
        self.synthetic = None
        if spec is not None:
            from tandem.spec_decode import make_proposer
            self.proposer = make_proposer(spec, config, self)
            self.num_spec_tokens = spec.num_speculative_tokens
            if spec.synthetic_acceptance_rate is not None:
                self.synthetic = SyntheticAcceptance(spec.synthetic_acceptance_rate)

    # ---- KV pool -------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        m = self.model
        return kv_block_bytes(self.kv_spec, self.block_size, m.num_kv_heads, m.head_dim)

    def available_kv_blocks(self) -> int:
        """How many KV blocks fit here (profiling peak memory on CUDA). Under tensor
        parallelism the pool is the minimum over the ranks."""
        peak = self._profile_peak_memory() if self.device.type == "cuda" else 0
        # a draft model keeps a pool of its own, block for block with the target's
        draft = getattr(self.proposer, "block_bytes", 0)
        return num_blocks_for(self.config.cache, self.block_bytes + draft, self.device, peak)

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate and bind a pool of `num_blocks` (+1, below), then capture CUDA graphs."""
        cuda = self.device.type == "cuda"
        self.num_blocks = num_blocks
        m = self.model
        # One extra block past the scheduler's pool: padding rows of CUDA-graph batches
        # write and read it, so no real sequence's cache is touched.
        self.kv_caches = allocate_kv_caches(m.num_layers, self.num_blocks + 1, self.block_size,
                                            m.num_kv_heads, m.head_dim, self.kv_spec,
                                            self.device)
        for layer, cache, spec in zip(m.attention_layers(), self.kv_caches, self.kv_spec):
            layer.kv_cache, layer.kv_scale = cache, spec.kv_scale
        if hasattr(self.proposer, "allocate"):
            self.proposer.allocate(num_blocks)
        if self.calibrate_kv_scales and any(
                s.dtype == torch.float8_e4m3fn for s in self.kv_spec):
            self._calibrate_kv_scales()
        backend = m.attention_layers()[0].backend
        if (cuda and not self.config.model.enforce_eager
                and getattr(backend, "supports_cuda_graphs", False)):
            sched = self.config.scheduler
            rows = sched.max_num_seqs * (1 + self.num_spec_tokens)  # verify rows count too
            self.graphs = CudaGraphRunner(m, min(rows, 512), sched.max_model_len,
                                          self.block_size, self.num_blocks, self.device,
                                          max_prefill_tokens=sched.max_num_batched_tokens,
                                          verify_rows=self.num_spec_tokens > 0)
            self.graphs.capture()
            logger.info("captured CUDA graphs for decode batch sizes %s and one-sequence "
                        "prefill sizes %s", self.graphs.sizes, self.graphs.prefill_sizes)
        elif self.device.type == "cpu" and not self.config.model.enforce_eager:
            self.cpu_decode = CpuDecodeRunner.create(m)

    @torch.inference_mode()
    def _calibrate_kv_scales(self, num_tokens: int = 512) -> None:
        """FP8 layers' (k_scale, v_scale) = amax / 448 of the K and V one forward over a
        fixed pseudo-random token sequence writes (calculate_kv_scales); the pool is
        cleared afterwards."""
        m = self.model
        t = min(num_tokens, self.num_blocks * self.block_size, self.config.model.max_model_len
                or num_tokens)
        gen = torch.Generator().manual_seed(self.config.model.seed)
        ids = torch.randint(0, self.vocab_size, (t,), generator=gen).to(self.device)
        seen: dict[int, list[float]] = {}
        layers = m.attention_layers()
        writers = []
        for i, layer in enumerate(layers):
            def record(k, v, cache, slots, scale, i=i, write=layer.backend.write_kv):
                seen[i] = [k.abs().amax().item(), v.abs().amax().item()]
                write(k, v, cache, slots, scale)
            writers.append(layer.backend)
            layer.backend = _Recorder(layer.backend, record)
        try:
            nb = -(-t // self.block_size)
            dev = self.device
            meta = AttentionMetadata(
                slot_mapping=torch.arange(t, device=dev),
                query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=dev),
                seq_lens=torch.tensor([t], dtype=torch.int32, device=dev),
                block_tables=torch.arange(nb, dtype=torch.int32, device=dev).view(1, nb),
                query_lens_cpu=[t], seq_lens_cpu=[t], max_query_len=t, max_seq_len=t,
                block_size=self.block_size)
            m(ids, torch.arange(t, device=dev), meta)
        finally:
            for layer, backend in zip(layers, writers):
                layer.backend = backend
        for i, (layer, spec) in enumerate(zip(layers, self.kv_spec)):
            if spec.dtype == torch.float8_e4m3fn:
                layer.kv_scale = tuple(max(a, 1e-6) / 448.0 for a in seen[i])
                self.kv_spec[i] = dataclasses.replace(spec, kv_scale=layer.kv_scale)
        for cache in self.kv_caches:
            cache.zero_()
        logger.info("calibrated FP8 KV scales: %s",
                    [tuple(round(x, 5) for x in s.kv_scale) for s in self.kv_spec])

    def _profile_peak_memory(self) -> int:
        """Run the largest step the scheduler may plan on a scratch pool; return peak bytes."""
        sched = self.config.scheduler
        tokens = min(sched.max_num_batched_tokens, max(sched.max_model_len, 1) * sched.max_num_seqs)
        scratch_blocks = -(-tokens // self.block_size) + 1
        m = self.model
        caches = allocate_kv_caches(m.num_layers, scratch_blocks, self.block_size,
                                    m.num_kv_heads, m.head_dim, self.kv_spec, self.device)
        for layer, cache in zip(m.attention_layers(), caches):
            layer.kv_cache = cache
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        dev = self.device
        seq_len = min(tokens, sched.max_model_len or tokens)
        lens = [seq_len] * (tokens // seq_len) + ([tokens % seq_len] if tokens % seq_len else [])
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        per_seq = -(-seq_len // self.block_size)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(tokens, device=dev) % (scratch_blocks * self.block_size),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(len(lens), per_seq, dtype=torch.int32, device=dev),
            query_lens_cpu=lens, seq_lens_cpu=lens, max_query_len=max(lens),
            max_seq_len=max(lens), block_size=self.block_size)
        with torch.inference_mode():
            ids = torch.zeros(tokens, dtype=torch.int64, device=dev)
            hidden = self.model(ids, torch.arange(tokens, device=dev) % seq_len, meta)
            rows = min(sched.max_num_seqs, tokens)
            logits = self.model.compute_logits(hidden[:rows])
            logits.float().log_softmax(-1).sort(dim=-1)  # the sampler's largest temporaries
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del caches, hidden, logits
        for layer in m.attention_layers():
            layer.kv_cache = torch.empty(0, device=dev)
        torch.cuda.empty_cache()
        return peak

    # ---- one step ------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

    def launch(self, plan: StepPlan) -> Launched:
        """Enqueue the step's device work; returns before it finishes (no host sync)."""
        apply_plan(self.states, plan)
        last_ids, last_rows = self._last_ids, self._last_rows
        self._last_ids, self._last_rows = None, {}
        if self.proposer is not None:
            for rid in plan.finished_request_ids:
                self.proposer.finish(rid)
        if plan.is_empty:
            return Launched(plan)
        if self.cpu_decode is not None and self.fault_token_id is None:
            # Plain decode rows, all plain greedy: step and argmax in one native call,
            # no tensors on the way (the sampler would take the same argmax).
            token_ids = self.cpu_decode.greedy(plan, self.states)
            if token_ids is not None:
                self._last_ids = token_ids
                self._last_rows = {s.request_id: i for i, s in enumerate(plan.seqs)}
                return Launched(plan, token_ids=token_ids)
        return self._launch(plan, last_ids, last_rows)

    @torch.inference_mode()
    def _launch(self, plan: StepPlan, last_ids: torch.Tensor | list[int] | None,
                last_rows: dict[str, int]) -> Launched:
        """The general step: inputs, forward (or a fused replay), logits, Sampler.
        last_ids, last_rows: the previous step's sampled ids (on the device, or a list
        from the greedy fused CPU step) and each request's row there (async inputs)."""
        inputs = None
        if self.cpu_decode is not None:  # plain decode rows: the fused step's standing inputs
            inputs = self.cpu_decode.decode_inputs(plan, self.states)
        if inputs is None:
            inputs = build_model_inputs(plan, self.states, self.block_size, self.device,
                                        last_rows)
        if inputs.inflight_rows is not None:
            if isinstance(last_ids, list):
                last_ids = torch.tensor(last_ids, device=self.device)
            inputs.input_ids[inputs.inflight_rows] = last_ids[inputs.inflight_src]
        if self.cpu_decode is not None and self.cpu_decode.can_run(inputs):
            logits = self.cpu_decode.logits(inputs)  # forward and LM head, one native call
        else:
            if self.graphs is not None and self.graphs.can_run(inputs):
                hidden = self.graphs.run(inputs)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn_metadata)
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
        num_sampled = sum(inputs.sample_counts)  # logits rows that sample
        states = [self.states[s.request_id] for s in plan.seqs]
        out = Launched(plan, inputs, logits=logits if inputs.prompt_lp_spans else None,
                       params=[st.params for st in states])
        for i, _, count in inputs.prompt_lp_spans:  # row r predicts token start + r + 1
            start = plan.seqs[i].start_pos + 1
            out.prompt_targets[i] = states[i].token_ids[start:start + count]
        if num_sampled:
            if self.fault_token_id is not None:
                self._inject_fault(plan, inputs.sample_rows)
            tensors = build_sampling_tensors(plan, self.states, inputs.sample_rows,
                                             self.vocab_size, self.device,
                                             inputs.sample_counts)
            # drafts sampled from a q (draft model, temperature > 0): keep the target's p
            qs = {i: self._draft_probs(plan.seqs[i]) for i in inputs.sample_rows
                  if plan.seqs[i].spec_token_ids}
            qs = {i: q for i, q in qs.items() if q is not None}
            sampled = self.sampler(logits[:num_sampled], tensors, keep_probs=bool(qs))
            out.draft_q, out.probs = qs, sampled.probs
            self._last_ids = sampled.token_ids
            # each seq's last sampled row (async scheduling; a step that verified drafts is
            # collected before the next is planned, so none of its seqs is read from here)
            ends = itertools.accumulate(inputs.sample_counts)
            self._last_rows = {plan.seqs[i].request_id: end - 1
                               for i, end in zip(inputs.sample_rows, ends)}
            out.host = tuple(_to_host(t) for t in (sampled.token_ids, sampled.logprobs,
                                                   sampled.logprob_token_ids, sampled.ranks)
                             if t is not None)
            if self.device.type == "cuda":
                out.event = torch.cuda.Event()
                out.event.record()
        return out

    def collect(self, launched: Launched) -> StepResult:
        """Wait for a launched step's sampled tokens (the step's one host sync)."""
        if launched.token_ids is not None:  # sampled on the host already
            tokens = [[t] for t in launched.token_ids]
            n = len(tokens)
            drafts = None
            if self.proposer is not None:
                with torch.inference_mode():
                    drafts = self._propose(launched.plan, tokens)
            return StepResult(tokens, [None] * n, [None] * n, drafts)
        return self._collect(launched)

    @torch.inference_mode()
    def _collect(self, launched: Launched) -> StepResult:
        if launched.inputs is None:
            return StepResult([], [], [], [] if self.proposer is not None else None)
        if launched.event is not None:
            launched.event.synchronize()
        return self._to_result(launched)

    def _inject_fault(self, plan: StepPlan, sample_rows: list[int]) -> None:
        for i in sample_rows:
            rid = plan.seqs[i].request_id
            if self.fault_token_id in self.states[rid].prompt_token_ids:
                raise InjectedFault(f"injected fault for request {rid}")

    def _to_result(self, launched: Launched) -> StepResult:
        plan, inputs, logits = launched.plan, launched.inputs, launched.logits
        n = len(plan.seqs)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[Logprobs] | None] = [None] * n
        ranks: list[list[int] | None] = [None] * n
        if launched.host:
            ids = launched.host[0].tolist()
            lp_vals = launched.host[1].tolist() if len(launched.host) > 1 else None
            lp_ids = launched.host[2].tolist() if lp_vals is not None else None
            lp_ranks = launched.host[3].tolist() if lp_vals is not None else None
            row = 0
            for i, count in zip(inputs.sample_rows, inputs.sample_counts):
                rows = range(row, row + count)
                row += count
                drafts = plan.seqs[i].spec_token_ids
                # The target's samples at the rows: accept drafts while they agree, then
                # the target's own token (lossless: verify.py).
                if not drafts:  # plain decoding (or a prefill's last chunk): one row
                    a, emitted = 0, [ids[rows[0]]]
                elif self.synthetic is not None:
                    a = self.synthetic.accepted(len(drafts))
                    emitted = drafts[:a] + [ids[rows[a]]]
                elif i in launched.draft_q:  # p/q rule
                    seq = plan.seqs[i]
                    emitted = accept_pq(launched.probs[rows.start:rows.stop],
                                        launched.draft_q[i], drafts, ids[rows[-1]],
                                        launched.params[i].seed,
                                        range(seq.end_pos - count + 1, seq.end_pos + 1))
                    a = len(emitted) - 1
                else:
                    a = accepted_length(drafts, [ids[r] for r in rows])
                    emitted = [ids[r] for r in rows[:a + 1]]
                tokens[i] = emitted
                k = launched.params[i].logprobs
                if k is not None and lp_vals is not None:
                    logprobs[i] = [dict(zip(lp_ids[r][: k + 1], lp_vals[r][: k + 1]))
                                   for r in rows[:a + 1]]
                    ranks[i] = [lp_ranks[r] for r in rows[:a + 1]]
        prompt_lps: list[list[Logprobs | None] | None] = [None] * n
        prompt_ranks: list[list[int | None] | None] = [None] * n
        if inputs.prompt_lp_spans:
            for i, row0, count in inputs.prompt_lp_spans:
                lp = logits[row0:row0 + count].float().log_softmax(dim=-1)
                prompt_lps[i], prompt_ranks[i] = _prompt_logprobs(
                    lp, launched.prompt_targets[i], launched.params[i].prompt_logprobs or 0)
        return StepResult(tokens, logprobs, prompt_lps, self._propose(plan, tokens),
                          ranks, prompt_ranks)

    def _draft_probs(self, seq) -> torch.Tensor | None:
        get = getattr(self.proposer, "draft_probs", None)
        return get(seq.request_id, seq.spec_token_ids) if get is not None else None

    def _propose(self, plan: StepPlan, tokens: list[list[int]]) -> list[list[int]] | None:
        """The proposer's guesses after each sampling seq's emitted tokens (speculative
        decoding; the scheduler decides how many of them the next step verifies)."""
        if self.proposer is None:
            return None
        rows = [i for i, t in enumerate(tokens) if t]
        drafts: list[list[int]] = [[] for _ in tokens]
        k = min(plan.num_spec_tokens, self.num_spec_tokens)
        if rows and k:
            rids = [plan.seqs[i].request_id for i in rows]
            # The runner's tokens end at the seq's last known input; then what it emitted.
            histories = [self.states[rid].token_ids[:plan.seqs[i].end_pos
                                                    - len(plan.seqs[i].spec_token_ids)]
                         + tokens[i] for rid, i in zip(rids, rows)]
            for i, h, guess in zip(rows, histories, self.proposer.propose(rids, histories, k)):
                if self.synthetic is not None:  # measure the machinery at k: pad to k
                    guess = (list(guess) + [h[-1]] * k)[:k]
                drafts[i] = guess
        return drafts

    @torch.inference_mode()
    def profile_spec_costs(self) -> dict[str, dict[int, float]]:
        """Seconds per step by rows, measured here (spec_decode/switch.py): "verify", the
        target's forward, logits and argmax over that many one-token queries (through the
        CUDA graphs or the fused CPU step where they apply); "draft", one draft-model
        forward at that batch (host proposers: nothing). Rows at context 1, in the spare
        block."""
        if self.proposer is None:
            return {}
        sched = self.config.scheduler
        limit = sched.max_num_seqs * (1 + self.num_spec_tokens)
        limit = min(limit, 512 if self.device.type == "cuda" else 64)
        sizes = [1 << i for i in range(10) if 1 << i <= limit]
        dummy = self.num_blocks * self.block_size  # the spare block's first slot
        verify, draft = {}, {}
        for rows in sizes:
            dev = self.device
            meta = AttentionMetadata(
                slot_mapping=torch.full((rows,), dummy, dtype=torch.int64, device=dev),
                query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device=dev),
                seq_lens=torch.ones(rows, dtype=torch.int32, device=dev),
                block_tables=torch.full((rows, 1), self.num_blocks, dtype=torch.int32,
                                        device=dev),
                query_lens_cpu=[1] * rows, seq_lens_cpu=[1] * rows, max_query_len=1,
                max_seq_len=1, block_size=self.block_size)
            ids = torch.zeros(rows, dtype=torch.int64, device=dev)
            pos = torch.zeros(rows, dtype=torch.int64, device=dev)
            fake = ModelInputs(ids, pos, meta, list(range(rows)), pos, [])

            def step() -> None:
                if self.cpu_decode is not None and self.cpu_decode.can_run(fake):
                    self.cpu_decode.logits(fake).argmax(dim=-1).tolist()
                    return
                if self.graphs is not None and self.graphs.can_run(fake):
                    hidden = self.graphs.run(fake)
                else:
                    hidden = self.model(ids, pos, meta)
                self.model.compute_logits(hidden).argmax(dim=-1).tolist()
            verify[rows] = _best_time(step)
            cost = getattr(self.proposer, "step_cost", None)
            if cost is not None:
                draft[rows] = cost(rows)
        logger.info("speculative decoding step costs (ms by rows): verify %s, draft %s",
                    {r: round(t * 1e3, 2) for r, t in verify.items()},
                    {r: round(t * 1e3, 2) for r, t in draft.items()} or "none")
        return {"verify": verify, "draft": draft}

def _prompt_logprobs(lp: torch.Tensor, target_ids: list[int], k: int
                     ) -> tuple[list[Logprobs | None], list[int | None]]:
    """lp: (count, vocab) log-probs whose row r predicts target_ids[r]; each entry holds the
    target's logprob and the top k; and each target's rank in its row."""
    targets = torch.tensor(target_ids, device=lp.device)
    chosen_t = lp.gather(1, targets.unsqueeze(1))
    ranks = ((lp > chosen_t).sum(dim=-1) + 1).tolist()
    chosen = chosen_t.squeeze(1).tolist()
    top_vals, top_ids = lp.topk(k, dim=-1) if k else (None, None)
    top_vals = top_vals.tolist() if k else None
    top_ids = top_ids.tolist() if k else None
    out: list[Logprobs | None] = []
    for r, tok in enumerate(targets.tolist()):
        entry = {tok: chosen[r]}
        if top_vals is not None:
            entry.update(zip(top_ids[r], top_vals[r]))
            entry[tok] = chosen[r]
        out.append(entry)
    return out, ranks


class _Recorder:
    """An attention backend whose write_kv goes through `record` first (calibration)."""

    def __init__(self, backend, record) -> None:
        self._backend, self.write_kv = backend, record

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


def _best_time(fn, reps: int = 5) -> float:
    """The fastest of `reps` timed calls after two warm-ups (the call syncs itself)."""
    import time
    fn()
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, started without waiting (pinned memory on CUDA)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
