"""The per-request stream the HTTP layer reads: unread events merge per choice, in order."""

from __future__ import annotations

import asyncio

from server.engine.async_engine import RequestStream
from server.engine.protocol import GenerationEvent, TokenLogprob, Usage


class _Engine:
    def __init__(self):
        self.aborted = []

    def abort(self, request_id):
        self.aborted.append(request_id)


def test_a_lagging_reader_gets_one_merged_event_per_choice():
    async def main():
        stream = RequestStream("r", _Engine(), n=2)
        stream._put(GenerationEvent("r", index=0, text="a", token_ids=[1], logprobs=[TokenLogprob(1, -0.1)]))
        stream._put(GenerationEvent("r", index=1, text="x", token_ids=[7]))
        stream._put(GenerationEvent("r", index=0, text="b", token_ids=[2], logprobs=[TokenLogprob(2, -0.2)]))
        stream._put(GenerationEvent("r", index=0, text="c", token_ids=[3], logprobs=[TokenLogprob(3, -0.3)],
                                    finished=True, finish_reason="length", usage=Usage(4, 3)))
        first = await stream.__anext__()
        assert (first.index, first.text, first.token_ids, first.finished) == (0, "abc", [1, 2, 3], True)
        assert [lp.logprob for lp in first.logprobs] == [-0.1, -0.2, -0.3] and first.usage.completion_tokens == 3
        second = await stream.__anext__()
        assert (second.index, second.text, second.finished) == (1, "x", False)
        reader = asyncio.ensure_future(stream.__anext__())  # waits for the next event
        await asyncio.sleep(0)
        assert not reader.done()
        stream._put(GenerationEvent("r", index=1, text="y", token_ids=[8], finished=True, finish_reason="stop"))
        last = await reader
        assert (last.text, last.finish_reason) == ("y", "stop") and stream.finished
        assert [e async for e in stream] == []

    asyncio.run(main())


def test_a_request_refused_in_the_step_thread_ends_every_choice():
    from server.engine.async_engine import AsyncEngine
    from server.engine.protocol import GenerationRequest, InvalidRequest, SamplingParams

    class Refusing:
        def add_request(self, request, **_):
            raise InvalidRequest("request id 'r' is already in use")

        def release_bank(self, handle):
            pass

    engine = AsyncEngine(None, engine=Refusing())
    engine._inbox.append(("add", (GenerationRequest("r", [1, 2], SamplingParams(), n=3), None)))
    events = engine._drain_inbox()  # a stream waiting for three final events gets three
    assert sorted(e.index for e in events) == [0, 1, 2]
    assert all(e.finished and e.finish_reason == "error" and "in use" in e.error for e in events)
