"""GPU timing for the kernel benchmarks: a CUDA graph of back-to-back calls, replayed and
timed with CUDA events, so launch overhead from Python is out of the figure (what a decode
step under CUDA graphs pays)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def graph_us(fns: Callable[[], Any] | Sequence[Callable[[], Any]], calls: int = 16,
             repeats: int = 10, warmup: int = 1, best: bool = False) -> float:
    """Microseconds per call: `calls` calls cycling through fns (several copies of the
    inputs keep consecutive calls out of L2) captured in one graph, replayed `repeats`
    times after `warmup` eager rounds and one untimed replay; the median replay (or the
    best, `best=True`)."""
    fns = [fns] if callable(fns) else list(fns)
    for _ in range(warmup):  # compiled and warm before the capture
        for f in fns:
            f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    times = [replay_us(graph) / calls for _ in range(repeats)]
    del graph
    return min(times) if best else statistics.median(times)


def replay_us(graph: torch.cuda.CUDAGraph, replays: int = 1) -> float:
    """Microseconds per replay of an already captured graph, `replays` back to back."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def per_call_s(fn: Callable[[], Any], reps: int = 1, cuda: bool = True) -> float:
    """Seconds per call of `reps` calls back to back: CUDA events around them (cuda), else
    the host clock."""
    if not cuda:
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps
