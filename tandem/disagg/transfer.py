"""An engine's side of a KV transfer (in-process engines: the uni-process executor).

    export_prompt(engine, rid, token_ids, skip)   prefill side, right after the request's
        prefill: pin the prompt's full blocks (past the `skip` the decode side holds), copy
        them to the host, unpin (they stay in its prefix cache) -> KVPayload
    import_payload(engine, payload, skip)          decode side: allocate blocks, write the
        payload into them, register them under their hashes -> the request added next finds
        them as a prefix hit

Between the import and the admission nothing but the decode engine's own scheduling runs,
and the imported blocks are freed last in LRU order, so they are evicted only if the pool
is that short; then the request recomputes them (correct, slower).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.disagg.connector import KVPayload
from tandem.runner.kv_memory import read_blocks, write_blocks


def _runner(engine):
    runner = engine.executor.runner
    if runner is None:
        raise NotImplementedError("KV transfer needs the uni-process executor for now "
                                  "(tensor-parallel workers hold their own shards)")
    return runner


def prompt_hashes(engine, token_ids: Sequence[int]) -> list[int]:
    return engine.scheduler.kv.prompt_block_hashes(token_ids)


def cached_blocks(engine, hashes: Sequence[int]) -> int:
    """Leading blocks of `hashes` this engine holds already."""
    return engine.scheduler.kv.cached_prefix(hashes)


def export_prompt(engine, request_id: str, hashes: Sequence[int], skip: int
                  ) -> KVPayload | None:
    """The blocks hashes[skip:] from `engine`'s prefix cache, or None if any was evicted."""
    kv = engine.scheduler.kv
    want = list(hashes[skip:])
    try:
        ids = kv.pin_cached(want)
    except ValueError:
        return None
    try:
        layers = read_blocks(_runner(engine).kv_caches, ids)
    finally:
        kv.unpin(ids)
    return KVPayload(request_id, want, layers)


def import_payload(engine, payload: KVPayload) -> bool:
    """Write the payload's blocks into `engine`'s pool and prefix cache; False (nothing
    changed) if the pool has no room for them. Blocks it holds already (another request
    brought the same prefix meanwhile) are skipped."""
    kv = engine.scheduler.kv
    new = [i for i, h in enumerate(payload.hashes) if not kv.is_cached(h)]
    if not new:
        return True
    ids = kv.allocate_for_import(len(new))
    if ids is None:
        return False
    layers = payload.layers
    if len(new) < len(payload.hashes):
        pick = torch.tensor(new)
        layers = [t.index_select(1, pick) for t in layers]
    try:
        write_blocks(_runner(engine).kv_caches, ids, layers)
        if layers and layers[0].is_cuda:  # the source may be another process's memory,
            torch.cuda.current_stream(layers[0].device).synchronize()  # released after this
    except Exception:
        kv.unpin(ids)
        raise
    kv.commit_import(ids, [payload.hashes[i] for i in new])
    return True
