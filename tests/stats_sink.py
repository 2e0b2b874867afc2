"""A stats sink for tests: it keeps every StepStats and RequestStats the engine reports, where the
server's Prometheus sink would turn them into metrics."""

from __future__ import annotations


class RecordingSink:
    def __init__(self):
        self.steps, self.requests = [], []

    def on_step(self, stats):
        self.steps.append(stats)

    def on_request_finished(self, stats):
        self.requests.append(stats)

    @property
    def hits(self) -> int:
        """Prompt tokens read from the prefix cache, over the steps so far."""
        return sum(s.prefix_cache_hits for s in self.steps)

    @property
    def prefill(self) -> int:
        """Prompt tokens computed, over the steps so far."""
        return sum(s.num_prefill_tokens for s in self.steps)

    @property
    def preempted(self) -> int:
        """Sequences preempted, over the steps so far."""
        return sum(s.num_preempted for s in self.steps)
