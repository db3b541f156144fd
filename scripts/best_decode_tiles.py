"""The FP8 decode tiles fastest summed over batches 64-256 in a scripts/bench_decode_attention.py
JSON record, printed as TANDEM_DECODE_TILES takes them ("128,4,3"; empty: the default).
Used by the bench/run_*_h200.sh scripts' `kv` steps.

    python scripts/best_decode_tiles.py decode-fp8.json"""

import json
import sys

rows = json.load(open(sys.argv[1]))["rows"]
big = ("b64-", "b128-", "b192-", "b256-")
tot: dict = {}
for r in rows:
    if any(b in r["case"] for b in big) and "us" in r:
        key = tuple(r["config"][:3]) if r["config"] else None
        tot.setdefault(key, []).append(r["us"])
full = {k: sum(v) for k, v in tot.items() if len(v) == len(big)}
best = min(full, key=full.get) if full else None
print(",".join(map(str, best)) if best else "")
