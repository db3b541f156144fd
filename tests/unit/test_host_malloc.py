"""A CPU engine sets glibc's malloc thresholds, so a prefill step's multi-MB activations
reuse freed heap instead of arriving as fresh pages that fault on first touch;
TANDEM_CPU_MALLOPT=0 leaves glibc's defaults. Each case runs in a fresh interpreter (the
thresholds are process-wide) and counts the minor page faults of a second prefill of 48
new prompts (~5,000 tokens), after a first one has warmed the heap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tandem.runner import host_malloc

pytestmark = pytest.mark.skipif(host_malloc._glibc() is None, reason="needs glibc")

PROBE = textwrap.dedent("""
    import random, resource
    from tandem import LLM, SamplingParams
    llm = LLM(max_model_len=512)
    def prompts(seed):
        r = random.Random(seed)
        return [[r.randrange(3, 8000) for _ in range(r.randint(16, 200))] for _ in range(48)]
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate(prompts(1), sp, use_tqdm=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    llm.generate(prompts(2), sp, use_tqdm=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_cpu_prefill_reuses_freed_memory_instead_of_faulting_in_pages():
    tuned, default = _faults({}), _faults({"TANDEM_CPU_MALLOPT": "0"})
    # Measured on the development box: 10-69 faults tuned, 15,877-34,918 with the defaults.
    assert tuned < 2_000, tuned
    assert default > 5 * tuned, (tuned, default)
