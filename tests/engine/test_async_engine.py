"""The async interface: concurrent streams, abort on disconnect, errors at submit, responsiveness."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.engine.async_engine import AsyncEngine
from server.engine.protocol import (EngineOverloaded, EngineStopped, GenerationRequest, InvalidRequest,
                                    SamplingParams)


def _prompt(n, seed=0):
    return torch.randint(3, 49000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


async def _collect(stream):
    return [e async for e in stream]


def test_streams_match_sync_engine(make_engine):
    prompts = [_prompt(5 + 4 * i, i) for i in range(6)]
    sync = make_engine().generate([GenerationRequest(f"r{i}", p, _greedy(8)) for i, p in enumerate(prompts)])

    async def main():
        engine = AsyncEngine(make_engine().config, engine=make_engine())
        await engine.start()
        assert engine.is_running
        streams = [engine.submit(GenerationRequest(f"r{i}", p, _greedy(8))) for i, p in enumerate(prompts)]
        outs = await asyncio.gather(*(_collect(s) for s in streams))
        await engine.stop()
        assert not engine.is_running
        return outs

    outs = asyncio.run(main())
    for i, events in enumerate(outs):
        assert [t for e in events for t in e.token_ids] == [t for e in sync[f"r{i}"] for t in e.token_ids]
        assert events[-1].finished and events[-1].finish_reason == "length" and events[-1].usage.completion_tokens == 8
        assert "".join(e.text for e in events) == "".join(e.text for e in sync[f"r{i}"])


def test_abort_disconnect_and_submit_errors(make_engine):
    async def main():
        llm = make_engine(max_waiting=2, max_num_seqs=1, max_model_len=64)
        engine = AsyncEngine(llm.config, engine=llm)
        start_free = llm.block_manager.num_free_blocks
        with pytest.raises(EngineStopped):
            engine.submit(GenerationRequest("x", _prompt(3), _greedy(2)))
        await engine.start()
        with pytest.raises(InvalidRequest, match="70 tokens"):
            engine.submit(GenerationRequest("x", _prompt(70), _greedy(2)))
        long = engine.submit(GenerationRequest("long", _prompt(10), _greedy(50)))
        first = await long.__anext__()
        assert first.token_ids and not first.finished
        # the loop keeps serving while we wait here: the event loop is not blocked by steps
        t0 = time.monotonic()
        await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 1.0
        engine.submit(GenerationRequest("w1", _prompt(4), _greedy(2)))
        engine.submit(GenerationRequest("w2", _prompt(4), _greedy(2)))
        with pytest.raises(EngineOverloaded):
            engine.submit(GenerationRequest("w3", _prompt(4), _greedy(2)))
        await long.aclose()  # client disconnect
        for _ in range(200):
            if engine.num_running == 0 and engine.num_waiting == 0:
                break
            await asyncio.sleep(0.02)
        assert llm.block_manager.num_free_blocks == start_free
        await engine.stop(grace_s=0.1)

    asyncio.run(main())


def test_stop_aborts_unfinished(make_engine):
    async def main():
        llm = make_engine()
        engine = AsyncEngine(llm.config, engine=llm)
        await engine.start()
        stream = engine.submit(GenerationRequest("a", _prompt(5), _greedy(400)))
        await stream.__anext__()
        await engine.stop(grace_s=0.0)
        events = [e async for e in stream]
        assert events[-1].finished and events[-1].finish_reason == "abort"
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks

    asyncio.run(main())
