"""DisaggLLM: a prefill engine and a decode engine in one process, with `LLM.generate`'s
contract (the offline form of disaggregation; the served, multi-process form is to come).

    generate(prompts, params)
      1. route every request (policy.py) by its prompt, the decode engine's cached prefix
         and the prefill engine's queue
      2. every request goes to the decode engine at once; remote ones wait there for
         their KV (WAITING_FOR_KV, receiver.py) while the local ones run
      3. remote ones also run on the prefill engine as one-token requests; as each
         finishes, its full prompt blocks the decode engine lacks go through the connector
      4. the engines step in turn; the decode engine imports what arrived (prefix-cache
         blocks), and those requests compute only their prompt's last partial block

The first token is sampled on the decode engine (greedy and seeded requests draw exactly
what a colocated engine draws); the prefill engine's is dropped. A transfer that fails or
finds no room falls back to prefilling on the decode engine; if the prefill engine itself
fails, every request it held falls back and later ones are routed locally.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import uuid
from typing import Any

from tandem.config import EngineConfig
from tandem.disagg import transfer
from tandem.disagg.connector import KVConnector, SharedMemoryConnector
from tandem.disagg.policy import DisaggPolicy, transferable
from tandem.disagg.receiver import KVReceiver
from tandem.engine.engine import Engine
from tandem.engine.llm import LLM
from tandem.outputs import RequestOutput
from tandem.request import RequestOutputKind, SamplingParams


logger = logging.getLogger(__name__)


class DisaggLLM(LLM):
    def __init__(self, model: str | None = None, policy: DisaggPolicy | str = "conditional",
                 connector: KVConnector | None = None, kv_timeout_s: float = 30.0,
                 **engine_args: Any) -> None:
        """kv_timeout_s: how long a decode-side request waits for KV that was sent but has
        not arrived before it prefills locally."""
        super().__init__(model, **engine_args)  # self.engine: the decode engine
        # Synchronous steps: a finished prefill's blocks are shipped before the next step
        # is planned (a pipelined one could evict them first).
        self.prefill = Engine(EngineConfig.from_kwargs(
            self.engine.config.model.model, **{**engine_args, "async_scheduling": False}))
        self.policy = policy if isinstance(policy, DisaggPolicy) else DisaggPolicy(policy)
        self.connector = connector or SharedMemoryConnector(uuid.uuid4().hex)
        self.receiver = self.engine.kv_receiver = KVReceiver(self.connector, kv_timeout_s)
        self._pids = itertools.count()
        self._remote: dict[str, list[int]] = {}  # request id -> its prompt's block hashes
        self._in_transit: set[int] = set()  # hashes sent since the decode engine last polled
        self._prefill_ids: dict[str, str] = {}  # request id -> its prefill-side request id
        # what went where and what moved (the served form exports these as metrics)
        self.stats = {"remote": 0, "local": 0, "blocks_sent": 0, "bytes_sent": 0,
                      "transfer_s": 0.0}

    def _transferable(self, sp: SamplingParams) -> bool:
        return transferable(sp, self.engine.config.cache.enable_prefix_caching
                            and self.prefill.config.cache.enable_prefix_caching)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True
                 ) -> list[RequestOutput]:
        ids, tokenized, params = self._prepare(prompts, sampling_params)
        size = self.engine.config.cache.block_size
        queued = self._prefill_backlog()
        for rid, (text, token_ids), sp in zip(ids, tokenized, params):
            hashes = transfer.prompt_hashes(self.engine, token_ids)
            held = transfer.cached_blocks(self.engine, hashes)
            route = self.policy.route(len(token_ids), held * size, queued,
                                      self.prefill is not None and held < len(hashes)
                                      and self._transferable(sp))
            self.stats[route] += 1
            sp = dataclasses.replace(sp, output_kind=RequestOutputKind.FINAL_ONLY)
            self.engine.add_request(rid, {"prompt": text, "prompt_token_ids": token_ids}, sp,
                                    awaiting_kv=route == "remote")
            if route == "remote":
                self._remote[rid] = hashes
                queued += len(token_ids)
                one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                                     output_kind=RequestOutputKind.FINAL_ONLY)
                self._prefill_ids[rid] = f"p{next(self._pids)}-{rid}"
                self.prefill.add_request(self._prefill_ids[rid],
                                         {"prompt_token_ids": token_ids}, one)
        return self._run(ids, use_tqdm)

    def _prefill_backlog(self) -> int:
        """Prompt tokens the prefill engine has yet to compute (the rule's load figure)."""
        if self.prefill is None:
            return 0
        return sum(r.num_tokens - r.num_computed_tokens
                   for r in self.prefill.scheduler.requests.values())

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        if request_id in self._prefill_ids and self.prefill is not None:
            self.prefill.abort_request(self._prefill_ids.pop(request_id))
        self._remote.pop(request_id, None)

    def _step_engines(self) -> list[RequestOutput]:
        """One prefill step (shipping what it finished), then one decode step."""
        if self.prefill is not None and self.prefill.has_unfinished_requests():
            try:
                finished = [o for o in self.prefill.step() if o.finished]
            except Exception as e:  # the prefill side is gone: everyone prefills here
                logger.error("prefill engine failed (%r): %d requests fall back to the "
                             "decode engine; routing everything there from now on", e,
                             len(self._remote))
                for rid in self._remote:
                    self.receiver.fail(rid)
                self._remote.clear()
                self._prefill_ids.clear()
                self.prefill = None
                finished = []
            for out in finished:
                self._ship(out.request_id.split("-", 1)[1])
        outputs = self.engine.step()  # imports everything shipped above, first
        self._in_transit.clear()
        self.receiver.settled.clear()  # (the served form's accounting)
        return outputs

    def _ship(self, rid: str) -> None:
        """Send a finished prefill's blocks that the decode engine lacks, before the next
        prefill step can evict them."""
        self._prefill_ids.pop(rid, None)
        hashes = self._remote.pop(rid, None)
        if hashes is None:  # aborted meanwhile
            return
        t0 = time.perf_counter()
        # what the decode side holds now (an earlier import may have brought a shared
        # prefix): only the rest moves
        held = transfer.cached_blocks(self.engine, hashes)
        while held < len(hashes) and hashes[held] in self._in_transit:
            held += 1  # sent for a request shipped just before: imported first
        if held == len(hashes):
            self.receiver.release(rid)
            return
        payload = transfer.export_prompt(self.prefill, rid, hashes, held)
        if payload is None:  # evicted before it could be read
            self.receiver.fail(rid)
            return
        self.connector.send(payload)
        self._in_transit.update(payload.hashes)
        self.stats["blocks_sent"] += len(payload.hashes)
        self.stats["bytes_sent"] += payload.nbytes
        self.stats["transfer_s"] += time.perf_counter() - t0
