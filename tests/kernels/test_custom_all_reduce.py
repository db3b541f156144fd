"""The custom IPC all-reduce (tandem/distributed/custom_all_reduce.py) against its PyTorch
reference and NCCL, on 2 GPUs of one host; and the reference itself, on CPU.

GPU tests spawn one process per rank (NCCL group + gloo group on a free local port); a
failed assertion in a child fails the test, and a hang (deadlock) fails it after a timeout.
NVLink multicast stays off everywhere (NCCL_NVLS_ENABLE=0 and friends).
"""

from __future__ import annotations

import importlib.util
import os
import random
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tandem.distributed.custom_all_reduce import CustomAllReduce, join_cuda_group
from tandem.envs import NO_NVLINK_MULTICAST
from tandem.kernels.reference.all_reduce import all_reduce_reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
WORLD = 2


def _two_gpus() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.device_count() >= WORLD


# -- CPU: the reference --------------------------------------------------------------


def test_reference_sums_in_rank_order_in_float32():
    # In float32, (1e8 + 1) - 1e8 == 0 but (1e8 - 1e8) + 1 == 1: the order is observable.
    ts = [torch.tensor([1e8]), torch.tensor([1.0]), torch.tensor([-1e8])]
    assert all_reduce_reference(ts).item() == 0.0
    assert all_reduce_reference([ts[0], ts[2], ts[1]]).item() == 1.0
    assert ts[0].item() == 1e8  # rank 0's input is not the accumulator


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_keeps_dtype_and_rounds_once(dtype):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(3, 17, generator=g).to(dtype) for _ in range(4)]
    out = all_reduce_reference(ts)
    assert out.dtype == dtype and out.shape == (3, 17)
    want = ((ts[0].float() + ts[1].float()) + ts[2].float()) + ts[3].float()
    assert torch.equal(out, want.to(dtype))


def test_reference_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        all_reduce_reference([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError):
        all_reduce_reference([])


def test_disabled_without_gpus_or_peers():
    assert not CustomAllReduce.is_available(1, torch.device("cpu"))
    assert not CustomAllReduce.is_available(2, torch.device("cpu"))
    car = CustomAllReduce(None, 0, 1, torch.device("cpu"))  # one rank: no collective
    assert car.disabled_reason and not car.enabled
    assert not car.should_use(torch.zeros(8))
    car.close()


# -- spawned ranks ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, body, max_bytes: int) -> None:
    device, car = join_cuda_group(rank, world, port, max_bytes)
    assert car.enabled, f"rank {rank}: {car.disabled_reason}"
    body(car, rank, world, device)  # on failure: raise, the parent stops the other ranks
    car.close()
    dist.destroy_process_group()


def _run_ranks(target, args: tuple, timeout_s: float) -> None:
    """target(rank, *args) in WORLD spawned processes; fails on a child error or timeout."""
    os.environ.update(NO_NVLINK_MULTICAST)
    ctx = mp.start_processes(target, args=args, nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        # join() raises if a child failed (and terminates the others); False: still running.
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{target.__name__}{args} still running after {timeout_s}s "
                            "(deadlock?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _spawn(body, timeout_s: float = 300.0, max_bytes: int = 8 * 2**20) -> None:
    _run_ranks(_rank_main, (WORLD, _free_port(), body, max_bytes), timeout_s)


def _cpu_rank_main(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    car = CustomAllReduce(dist.group.WORLD, rank, world, torch.device("cpu"))
    # Every rank learns every rank's reason, so no rank is left enabled alone.
    assert not car.enabled and "rank 0" in car.disabled_reason
    assert "rank 1" in car.disabled_reason and "not CUDA" in car.disabled_reason
    assert not car.should_use(torch.zeros(8))
    car.close()
    dist.destroy_process_group()


def test_ranks_agree_to_disable():
    _run_ranks(_cpu_rank_main, (WORLD, _free_port()), timeout_s=120)


def _pattern(i: int, rank: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(n,) multiples of 1/8 in [-6, 6], different for every call i and rank."""
    k = torch.arange(n, device=device, dtype=torch.int64)
    return (((k * (2 * rank + 3) + 7 * i) % 97) - 48).to(torch.float32).div_(8).to(dtype)


def _gather(x: torch.Tensor, world: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return parts


def _parity_body(car, rank, world, device) -> None:
    for dtype in DTYPES:
        size = torch.empty((), dtype=dtype).element_size()
        numels = sorted({1, 2, 3, 7, 64, 1000, 4096, 4097, 8192 // size, 65536 // size,
                         2**20 // size, 2**20 // size + 1, 8 * 2**20 // size,
                         8 * 2**20 // size - 3})
        shapes = [(n,) for n in numels] + [(7, 4096)]
        for shape in shapes:
            g = torch.Generator(device=device).manual_seed(1000 * rank + shape[-1])
            x = torch.randn(shape, generator=g, device=device).to(dtype)
            assert car.should_use(x), (shape, dtype)
            out = car.all_reduce(x)
            what = f"{dtype} {shape}"
            assert out.shape == x.shape and out.dtype == dtype, what
            assert torch.equal(out, all_reduce_reference(_gather(x, world))), what
            nccl = x.clone()
            dist.all_reduce(nccl)
            torch.testing.assert_close(out, nccl, msg=what)
            outs = _gather(out, world)
            assert all(torch.equal(outs[0], o) for o in outs), f"ranks differ: {what}"


def _graph_body(car, rank, world, device) -> None:
    small = torch.zeros(4096, dtype=torch.bfloat16, device=device)  # 8 KB: one program
    big = torch.zeros(3 * 2**18 + 5, dtype=torch.float16, device=device)  # 1.5 MB: many
    car.all_reduce(small)  # compile both before capturing
    car.all_reduce(big)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_small = car.all_reduce(small)
        out_big = car.all_reduce(big)
    for i in range(100):
        small.copy_(_pattern(i, rank, small.numel(), small.dtype, device))
        big.copy_(_pattern(i, rank, big.numel(), big.dtype, device))
        graph.replay()
        for x, out in ((small, out_small), (big, out_big)):
            want = all_reduce_reference([_pattern(i, r, x.numel(), x.dtype, device)
                                         for r in range(world)])
            assert torch.equal(out, want), f"replay {i}, {x.dtype}"
    x = _pattern(100, rank, 4096, torch.bfloat16, device)  # eager calls resume in step
    want = all_reduce_reference([_pattern(100, r, 4096, x.dtype, device) for r in range(world)])
    assert torch.equal(car.all_reduce(x), want)


def _stress_body(car, rank, world, device) -> None:
    rng = random.Random(1234)  # the same plan on every rank
    plan = [(rng.choice([1, 7, 4096, 4097, 12288, 65536, 131071]), rng.choice(DTYPES))
            for _ in range(2000)]
    outs = []
    for i, (n, dtype) in enumerate(plan):
        if (i + 13 * rank) % 97 == 0:  # let one rank fall behind, the other run ahead
            torch.cuda._sleep(100_000)
        outs.append(car.all_reduce(_pattern(i, rank, n, dtype, device)))
    torch.cuda.synchronize()
    for i, ((n, dtype), out) in enumerate(zip(plan, outs)):
        want = all_reduce_reference([_pattern(i, r, n, dtype, device) for r in range(world)])
        assert torch.equal(out, want), f"call {i}: {n} x {dtype}"


def _should_use_body(car, rank, world, device) -> None:
    bf16 = torch.bfloat16
    assert car.should_use(torch.empty(car.max_bytes // 2, dtype=bf16, device=device))
    assert not car.should_use(torch.empty(car.max_bytes // 2 + 1, dtype=bf16, device=device))
    assert not car.should_use(torch.empty(64, 128, dtype=bf16, device=device).t())
    assert not car.should_use(torch.empty(4096, dtype=bf16))  # CPU
    assert not car.should_use(torch.empty(4096, dtype=torch.int32, device=device))
    other = torch.device("cuda", (rank + 1) % world)
    assert not car.should_use(torch.empty(4096, dtype=bf16, device=other))


@pytest.mark.parametrize("body", [_parity_body, _graph_body, _stress_body, _should_use_body],
                         ids=["parity", "cuda_graph", "stress_2000", "should_use"])
@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs and triton")
def test_custom_all_reduce(body):
    _spawn(body)
