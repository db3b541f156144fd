import time, statistics, types, ctypes, random
from tandem import LLM
from tandem.bench.cli import _throughput_workload, _random_prompts
from tandem.request import SamplingParams
libc = ctypes.CDLL("libc.so.6")
M_TRIM, M_MMAP = -1, -3
def mode(on):
    if on:
        assert libc.mallopt(M_MMAP, 32 << 20) == 1 and libc.mallopt(M_TRIM, 1 << 30) == 1
    else:  # glibc defaults: 128 KiB (dynamic) and 128 KiB
        assert libc.mallopt(M_MMAP, 128 << 10) == 1 and libc.mallopt(M_TRIM, 128 << 10) == 1
llm = LLM()
args = types.SimpleNamespace(seed=0, num_prompts=48, input_len_range=(16, 200), output_len_range=(16, 128), input_len=0, output_len=0)
_, in_lens, out_lens = _throughput_workload(args, llm.engine.vocab_size)
eng = llm.engine; orig = eng.step; log = []
def step():
    t = time.perf_counter(); r = orig(); log.append(time.perf_counter() - t); return r
eng.step = step
params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in out_lens]
llm.generate(_random_prompts(48, in_lens, llm.engine.vocab_size, 999), params, use_tqdm=False)
res = {False: [], True: []}
for rnd in range(12):
    on = (rnd % 4) in (1, 2)
    mode(on)
    log.clear()
    t = time.perf_counter()
    llm.generate(_random_prompts(48, in_lens, llm.engine.vocab_size, 1000 + rnd), params, use_tqdm=False)
    el = time.perf_counter() - t
    res[on].append((el, log[0], sum(log[1:])))
    print(f"mallopt={on!s:5} total {el:.3f} s prefill step {log[0]*1e3:7.1f} ms decode {sum(log[1:]):.3f} s", flush=True)
for on in (False, True):
    print(on, "median total", statistics.median(r[0] for r in res[on]), "prefill", statistics.median(r[1] for r in res[on]))
