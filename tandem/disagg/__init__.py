"""Prefill/decode disaggregation: a prefill engine computes prompts, their KV blocks move to
a decode engine, which decodes as if those blocks were prefix-cache hits.

    policy.py     the routing rule per request: remote prefill or local (always / never /
                  conditional on the uncached prompt length and the prefill side's load)
    connector.py  KVConnector (send a request's blocks, receive them) and its host
                  shared-memory implementation
    transfer.py   an engine's side of a transfer: export (pin, read) and import (allocate,
                  write, register as prefix-cache blocks)
    local.py      DisaggLLM: one prefill and one decode engine in one process (offline API)
    worker.py     the served form's worker roles (DecodeSide, PrefillSide) and messages
    frontend.py   DisaggAsyncEngine: P prefill + D decode engine processes behind
                  AsyncEngine's interface (`tandem serve --prefill-workers P ...`)
    config.py     DisaggConfig (the serve flags); metrics.py: its Prometheus series

Blocks are named by the prefix cache's chained hashes (kv_cache/block_manager.py), equal in
every process, so a decode engine receives only the blocks it does not already hold.
"""
