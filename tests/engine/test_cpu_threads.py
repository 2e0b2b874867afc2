"""One OpenMP team per server process: the step thread keeps the engine's torch threads, every other
thread runs torch on one, and the thread that built the engine hands its OpenMP pool back."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from server.engine import cpu_threads
from server.engine.async_engine import AsyncEngine


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_thread_keeps_its_count_when_the_process_setting_changes(two_threads):
    seen, fixed, go = {}, threading.Event(), threading.Event()

    def owner():
        cpu_threads.own_thread_count(2)
        fixed.set()
        go.wait()
        seen["owner"] = torch.get_num_threads()

    t = threading.Thread(target=owner)
    t.start()
    fixed.wait()
    cpu_threads.single_threaded_elsewhere()
    go.set()
    t.join()
    later = threading.Thread(target=lambda: seen.setdefault("later", torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == {"owner": 2, "later": 1}
    assert torch.get_num_threads() == 1


def test_the_runtime_releases_a_pool():
    if cpu_threads.openmp_runtime() is None:
        pytest.skip("no OpenMP runtime loaded (not Linux, or torch without OpenMP)")
    x = torch.randn(512, 512)
    (x @ x).sum()  # a parallel region: this thread has a pool
    assert cpu_threads.release_thread_pool()
    assert torch.allclose(x @ x, x @ x)  # and runs parallel ops again after


class CountingEngine:
    """The surface the step loop uses; records the torch thread count of the thread that steps."""

    def __init__(self):
        self.step_threads: list[int] = []
        self.pending = 1
        self.sequences: dict = {}  # what the loop aborts when it stops

    def has_unfinished(self) -> bool:
        return self.pending > 0

    def step(self):
        self.step_threads.append(torch.get_num_threads())
        self.pending -= 1
        return []


@pytest.mark.parametrize("own", [True, False])
def test_async_engine_gives_the_step_thread_the_threads(two_threads, own):
    fake = CountingEngine()
    engine = AsyncEngine(None, engine=fake, own_cpu_threads=own)

    async def run():
        await engine.start()
        caller = torch.get_num_threads()
        for _ in range(200):
            if fake.step_threads:
                break
            await asyncio.sleep(0.01)
        await engine.stop()
        return caller

    caller = asyncio.run(run())
    assert fake.step_threads == [2]
    assert caller == (1 if own else 2)
    assert torch.get_num_threads() == 2  # restored when the engine stops
