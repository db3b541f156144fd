"""`AsyncEngine` in-process: the server's engine thread without HTTP. Validation raises before
anything is queued, a consumer that stops aborts its request (blocks freed), a failing step
fails the live requests and the loop keeps serving, shutdown aborts what is left."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tandem.config import EngineConfig
from tandem.engine.async_engine import AsyncEngine, EngineError, EngineStopped
from tandem.engine.engine import Engine
from tandem.engine.stats import EngineStats
from tandem.request import SamplingParams
from tests.model_factory import make_tiny_model

LONG = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0.0)
SHORT = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("m"), "LlamaForCausalLM")
    return Engine(EngineConfig.from_kwargs(path, max_model_len=256, num_kv_blocks=64))


class Recorder:
    """The step hook: remembers the latest stats snapshot (written by the engine thread)."""

    def __init__(self) -> None:
        self.stats: EngineStats | None = None
        self.changed = threading.Event()

    def __call__(self, outputs: list, stats: EngineStats) -> None:
        self.stats = stats
        self.changed.set()

    async def until_idle(self, timeout: float = 10.0) -> EngineStats:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            s = self.stats
            if s is not None and s.num_running == s.num_waiting == s.num_kv_blocks_used == 0:
                return s
            await asyncio.sleep(0.01)
        raise AssertionError(f"engine not idle: {self.stats}")


def run(engine: Engine, body) -> None:
    """Run `body(async_engine, recorder)` on a fresh AsyncEngine, then shut it down."""
    async def main() -> None:
        rec = Recorder()
        ae = AsyncEngine(engine, on_step=rec)
        ae.start()
        try:
            await asyncio.wait_for(body(ae, rec), timeout=60)
        finally:
            await ae.shutdown()
        assert not engine.has_unfinished_requests()

    asyncio.run(main())


def test_generate_streams_cumulative_outputs(engine):
    async def body(ae: AsyncEngine, rec: Recorder) -> None:
        outs = [o async for o in ae.generate("a", [5, 6, 7], SHORT)]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 6
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths)
        async def collect(rid: str) -> list:
            return [o async for o in ae.generate(rid, [5, 6, 7], SHORT)]

        both = await asyncio.gather(collect("b0"), collect("b1"))  # batched together
        assert both[0][-1].outputs[0].token_ids == outs[-1].outputs[0].token_ids
        assert both[1][-1].outputs[0].token_ids == outs[-1].outputs[0].token_ids

    run(engine, body)


def test_bad_input_raises_synchronously_and_queues_nothing(engine):
    async def body(ae: AsyncEngine, rec: Recorder) -> None:
        for prompt in ("", [], [1, 10**7], [5] * 256):
            with pytest.raises(ValueError):
                ae.add_request("bad", prompt, SHORT)
        assert ae.num_live_requests == 0
        gen = ae.generate("bad2", "", SHORT)
        with pytest.raises(ValueError, match="prompt"):
            await anext(gen)
        assert ae.num_live_requests == 0

    run(engine, body)


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_consumer_that_stops_aborts_and_frees_blocks(engine, how):
    async def body(ae: AsyncEngine, rec: Recorder) -> None:
        before = engine.stats().generation_tokens_total  # the engine thread is idle here
        gen = ae.generate("long", [5, 6, 7], LONG)
        if how == "aclose":
            first = await anext(gen)
            assert not first.finished
            await gen.aclose()
        else:
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in gen:
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        stats = await rec.until_idle()
        assert stats.generation_tokens_total - before < 200  # stopped early, not run to the end

    run(engine, body)


def test_failing_step_fails_live_requests_and_loop_keeps_serving(engine, monkeypatch):
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)

    async def body(ae: AsyncEngine, rec: Recorder) -> None:
        with pytest.raises(EngineError, match="boom"):
            async for _ in ae.generate("doomed", [5, 6, 7], LONG):
                pass
        await rec.until_idle()
        outs = [o async for o in ae.generate("after", [5, 6, 7], SHORT)]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 6

    run(engine, body)


def test_shutdown_aborts_unfinished_and_refuses_new(engine):
    async def body(ae: AsyncEngine, rec: Recorder) -> None:
        gen = ae.generate("long", [5, 6, 7], LONG)
        await anext(gen)
        await ae.shutdown(timeout=0.0)
        with pytest.raises(EngineStopped):
            async for _ in gen:
                pass
        with pytest.raises(EngineStopped):
            ae.add_request("late", [5, 6], SHORT)

    run(engine, body)
