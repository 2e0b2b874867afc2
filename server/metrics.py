"""Prometheus series, all made here from the engine's per-step and per-request statistics.

``ServerMetrics`` is the engine's ``StatsSink``: the engine calls ``on_step`` once per step and
``on_request_finished`` once per finished request, after the work is done; routing statistics arrive
as counts in ``StepStats.routing`` (server/engine/routing_stats.py). Nothing in the model or the
kernels touches a metric. The HTTP layer adds bank load / unload events and rejected requests.

Every name is documented in README.md (## Metrics). ``vllm:*`` names keep vLLM's meaning so its
dashboards and the Gateway API inference extension work unchanged.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from server.engine.protocol import RequestStats, StepStats
from server.engine.routing_stats import ENTROPY_BUCKETS, RoutingStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # a decode row .. long prefills
EXPERTS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256)
BANK_OP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _to_list(counts: Any) -> list[float]:
    if hasattr(counts, "tolist"):  # torch / numpy: one device read per array
        return counts.tolist()
    return list(counts)


class CountHistogram(Collector):
    """A labelled histogram fed with whole bucket counts (or many values at once) per call, so a
    step's thousands of observations cost one call. Exposed like a prometheus_client Histogram."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]):
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(float(b) for b in buckets)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], list[float]] = {}  # labels -> [bucket counts..., +Inf count, sum]

    def _row(self, labels: tuple[str, ...]) -> list[float]:
        row = self._series.get(labels)
        if row is None:
            row = self._series[labels] = [0.0] * (len(self.buckets) + 2)
        return row

    def add_counts(self, labels: tuple[str, ...], counts: Sequence[float], total: float) -> None:
        """``counts``: non-cumulative, one per bucket plus one for +Inf; ``total``: the values' sum."""
        with self._lock:
            row = self._row(labels)
            for i, c in enumerate(counts[: len(self.buckets) + 1]):
                row[i] += c
            row[-1] += total

    def observe_many(self, labels: tuple[str, ...], values: Iterable[float]) -> None:
        counts = [0] * (len(self.buckets) + 1)
        total = 0.0
        for v in values:
            counts[bisect.bisect_left(self.buckets, v)] += 1
            total += v
        self.add_counts(labels, counts, total)

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = {k: list(v) for k, v in self._series.items()}
        for labels, row in series.items():
            cumulative, acc = [], 0.0
            for edge, c in zip(self.buckets + (float("inf"),), row[:-1]):
                acc += c
                cumulative.append((_edge(edge), acc))
            family.add_metric(list(labels), cumulative, row[-1])
        yield family

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]


class CountVectors(Collector):
    """A labelled counter whose last label indexes a vector: each call adds a whole step's vectors
    (per site, the selections of each expert), accumulated as arrays and expanded into series only
    when scraped. With 8 DynMoLE banks x 90 sites x 6 experts, per-series ``labels().inc()`` cost
    ~12 ms per engine step; this costs one stack and one add per bank and vector length."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], index_label: str):
        self.name, self.documentation = name, documentation
        self.labelnames, self.index_label = tuple(labelnames), index_label
        self._lock = threading.Lock()
        self._blocks: dict[tuple, Any] = {}  # (head labels, tails) -> int64 counts [len(tails), n]
        self._tails: dict[tuple, tuple] = {}  # add_block's sites -> their label tuples

    def add(self, head: tuple[str, ...], rows: dict[tuple[str, ...], Any]) -> None:
        """``rows``: tail labels -> counts (a tensor or a list), one per index of the last label."""
        import torch

        by_len: dict[int, list] = {}
        for tail, counts in rows.items():
            c = torch.as_tensor(counts).reshape(-1)
            by_len.setdefault(c.numel(), []).append((tail, c))
        for items in by_len.values():
            self._accumulate((head, tuple(t for t, _ in items)), torch.stack([c for _, c in items]))

    def add_block(self, head: tuple[str, ...], sites: tuple, counts: Any) -> None:
        """A whole block at once: ``counts`` [len(sites), n] (a tensor), row i for the tail labels
        ``sites[i]`` (each a tuple of values, turned into strings here, once per distinct block)."""
        tails = self._tails.get(sites)
        if tails is None:
            tails = self._tails[sites] = tuple(tuple(str(v) for v in site) for site in sites)
            if len(self._tails) > 4096:
                self._tails.clear()
        self._accumulate((head, tails), counts)

    def _accumulate(self, key: tuple, counts: Any) -> None:
        import torch

        mat = counts.to(torch.int64, copy=True)
        with self._lock:
            acc = self._blocks.get(key)
            self._blocks[key] = mat if acc is None else acc.add_(mat)

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=(*self.labelnames, self.index_label))
        totals: dict[tuple[str, ...], int] = {}
        with self._lock:
            blocks = [(k, v.tolist()) for k, v in self._blocks.items()]
        for (head, tails), mat in blocks:
            for tail, row in zip(tails, mat):
                for i, c in enumerate(row):
                    if c:
                        labels = (*head, *tail, str(i))
                        totals[labels] = totals.get(labels, 0) + c
        for labels, c in totals.items():
            family.add_metric(list(labels), float(c))
        yield family

    def describe(self):
        return [CounterMetricFamily(self.name, self.documentation, labels=(*self.labelnames, self.index_label))]


class ResidencyCollector(Collector):
    """The bank registry's residency counters (``adapters.runtime.residency.ResidencyStats``),
    read from ``source()`` at scrape time: loads, evictions, hits and misses per tier, load latency,
    banks resident per tier. Nothing is counted twice: the registry owns the numbers."""

    def __init__(self):
        self.source = None  # callable -> ResidencyStats, set by ``ServerMetrics.watch_residency``

    def collect(self):
        stats = self.source() if self.source is not None else None
        if stats is None:
            return
        loads = CounterMetricFamily("moleserve_bank_loads", "Bank loads by trigger (on_demand, admin) and result.",
                                    labels=("trigger", "result"))
        for (trigger, result), n in sorted(stats.loads.items()):
            loads.add_metric([trigger, result], float(n))
        yield loads
        for name, doc, counts in (
                ("moleserve_bank_evictions", "Banks evicted from a tier (host: to disk; pool: to host memory).",
                 stats.evictions),
                ("moleserve_bank_hits", "Requests whose bank was in the tier (host memory, expert pool).", stats.hits),
                ("moleserve_bank_misses", "Requests whose bank had to be brought into the tier.", stats.misses)):
            family = CounterMetricFamily(name, doc, labels=("tier",))
            for tier in ("host", "pool"):
                family.add_metric([tier], float(counts.get(tier, 0)))
            yield family
        from adapters.runtime.residency import LOAD_BUCKETS  # noqa: PLC0415 - only with a registry

        cumulative, buckets = 0, []
        for edge, n in zip((*LOAD_BUCKETS, float("inf")), stats.load_buckets):
            cumulative += n
            buckets.append((_edge(edge), float(cumulative)))
        yield HistogramMetricFamily("moleserve_bank_load_seconds", "Duration of bank loads (disk to host memory).",
                                    buckets=buckets, sum_value=stats.load_sum)
        resident = GaugeMetricFamily("moleserve_banks_resident", "Banks in each tier now (disk: evicted, known).",
                                     labels=("tier",))
        for tier in ("disk", "host", "pool"):
            resident.add_metric([tier], float(stats.resident.get(tier, 0)))
        yield resident

    def describe(self):
        return []


def _edge(edge: float) -> str:
    return "+Inf" if edge == float("inf") else repr(float(edge))


class ServerMetrics:
    """Implements ``server.engine.protocol.StatsSink``. One instance (and one registry) per app."""

    def __init__(self, model_name: str, *, max_lora: int = 0, registry: CollectorRegistry | None = None):
        disable_created_metrics()  # no *_created series: half the series, nothing any dashboard reads
        self.model_name = model_name
        self.max_lora = max_lora
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model_name"]
        self._lora_labels: tuple[str, str, str] | None = None
        self._lora_banks: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())

        # vLLM-compatible
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch.", m, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", m, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage: fraction of blocks in use (0 to 1).", m, registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "Banks of running and waiting requests (value: time of the last change).",
                               ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        self.cache_info = Gauge("vllm:cache_config_info", "KV-cache configuration (labels; value 1).",
                                ["block_size", "num_gpu_blocks", "cache_dtype"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to first token.", m, buckets=TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", m, buckets=LATENCY_BUCKETS, registry=r)
        self.iteration_tokens = Histogram("vllm:iteration_tokens_total", "Tokens per engine step (prefill and decode).", m,
                                          buckets=ITERATION_TOKENS_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of finished requests.", m, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens (of sequences admitted).",
                                      m, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens (KV reused, not computed).",
                                   m, registry=r)

        # moleserve
        self.requests = Counter("moleserve_requests", "Finished requests by bank and finish reason.",
                                ["bank", "finish_reason"], registry=r)
        self.bank_prompt_tokens = Counter("moleserve_prompt_tokens", "Prompt tokens of finished requests by bank.", ["bank"], registry=r)
        self.bank_generation_tokens = Counter("moleserve_generation_tokens", "Generated tokens of finished requests by bank.",
                                              ["bank"], registry=r)
        self.queue_time = Histogram("moleserve_queue_time_seconds", "Arrival to first scheduled.", ["bank"],
                                    buckets=QUEUE_BUCKETS, registry=r)
        self.inter_token = CountHistogram("moleserve_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                                          ["bank"], ITL_BUCKETS)
        self.expert_selections = CountVectors("moleserve_expert_selections", "Routing decisions that selected an expert.",
                                              ["bank", "layer", "target"], "expert")
        self.routed_tokens = Counter("moleserve_routed_tokens", "Tokens that went through a bank's routers.", ["bank"], registry=r)
        self.routing_decisions = Counter("moleserve_routing_decisions", "Token x routed-site routing decisions.", ["bank"], registry=r)
        self.broadcast_decisions = Counter("moleserve_broadcast_decisions",
                                           "Routing decisions broadcast to all experts (DynMoLE).", ["bank"], registry=r)
        self.broadcast_rate = Gauge("moleserve_broadcast_rate", "Fraction of the last step's routing decisions that broadcast.",
                                    ["bank"], registry=r)
        self.routing_entropy = CountHistogram("moleserve_routing_entropy", "Router entropy per decision, normalised to [0, 1].",
                                              ["bank"], ENTROPY_BUCKETS)
        self.experts_per_token = CountHistogram("moleserve_experts_per_token", "Experts used per routing decision.",
                                                ["bank"], EXPERTS_BUCKETS)
        self.pool_slots_used = Gauge("moleserve_pool_slots_in_use", "Expert-pool slots holding bank weights.", registry=r)
        self.pool_slots_total = Gauge("moleserve_pool_slots_total", "Expert-pool slots in all.", registry=r)
        self.bank_events = Counter("moleserve_bank_events", "Bank load and unload attempts by result.",
                                   ["action", "result"], registry=r)
        self.bank_op_duration = Histogram("moleserve_bank_operation_duration_seconds", "Duration of bank loads and unloads.",
                                          ["action"], buckets=BANK_OP_BUCKETS, registry=r)
        self.banks_loaded = Gauge("moleserve_banks_loaded", "Banks loaded now.", registry=r)
        self.preemptions = Counter("moleserve_preemptions", "Sequences preempted for lack of KV blocks.", registry=r)
        self.rejected = Counter("moleserve_rejected_requests", "Requests refused before the engine ran them.", ["reason"], registry=r)
        self.residency = ResidencyCollector()
        for c in (self.inter_token, self.routing_entropy, self.experts_per_token, self.expert_selections,
                  self.residency):
            r.register(c)
        for g in (self.running, self.waiting, self.kv_usage):
            g.labels(model_name).set(0)
        for c in (self.prefix_queries, self.prefix_hits):
            c.labels(model_name)  # present (at 0) before the first request
        self._set_lora_info((), ())

    # -- StatsSink -------------------------------------------------------------------------------

    def on_step(self, stats: StepStats) -> None:
        name = self.model_name
        self.running.labels(name).set(stats.num_running)
        self.waiting.labels(name).set(stats.num_waiting)
        self.kv_usage.labels(name).set(stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0)
        if stats.num_prefill_tokens or stats.num_decode_tokens:
            self.iteration_tokens.labels(name).observe(stats.num_prefill_tokens + stats.num_decode_tokens)
        if stats.num_preempted:
            self.preemptions.inc(stats.num_preempted)
        if stats.prefix_cache_queries:
            self.prefix_queries.labels(name).inc(stats.prefix_cache_queries)
            self.prefix_hits.labels(name).inc(stats.prefix_cache_hits)
        self._set_lora_info(stats.running_banks, stats.waiting_banks)
        if isinstance(stats.routing, RoutingStats):
            self._on_routing(stats.routing)

    def on_request_finished(self, stats: RequestStats) -> None:
        name, bank = self.model_name, stats.bank or self.model_name
        self.requests.labels(bank, stats.finish_reason).inc()
        self.prompt_tokens.labels(name).inc(stats.prompt_tokens)
        self.generation_tokens.labels(name).inc(stats.completion_tokens)
        self.bank_prompt_tokens.labels(bank).inc(stats.prompt_tokens)
        self.bank_generation_tokens.labels(bank).inc(stats.completion_tokens)
        self.e2e.labels(name).observe(stats.e2e_s)
        if stats.ttft_s is not None:
            self.ttft.labels(name).observe(stats.ttft_s)
        self.queue_time.labels(bank).observe(stats.queue_time_s)
        if stats.inter_token_s:
            self.inter_token.observe_many((bank,), stats.inter_token_s)

    # -- events from the HTTP layer ----------------------------------------------------------------

    def on_bank_operation(self, action: str, duration_s: float, ok: bool, banks_loaded: int | None = None) -> None:
        """``action``: "load" or "unload"."""
        self.bank_events.labels(action, "ok" if ok else "error").inc()
        self.bank_op_duration.labels(action).observe(duration_s)
        if banks_loaded is not None:
            self.banks_loaded.set(banks_loaded)

    def on_rejected(self, reason: str) -> None:
        """``reason``: "overloaded" (429), "shutting_down" (503), "too_large" (413)."""
        self.rejected.labels(reason).inc()

    def set_load(self, num_running: int, num_waiting: int, kv_usage: float) -> None:
        """The engine's current load, read at scrape time: the last step's stats go stale when the
        engine idles (an abort between steps, say)."""
        self.running.labels(self.model_name).set(num_running)
        self.waiting.labels(self.model_name).set(num_waiting)
        self.kv_usage.labels(self.model_name).set(kv_usage)

    def set_bank_activity(self, running: Iterable[str], waiting: Iterable[str]) -> None:
        """Banks of running and waiting requests, read at scrape time (like ``set_load``)."""
        self._set_lora_info(running, waiting)

    def set_max_lora(self, max_lora: int) -> None:
        """Banks that can be resident at once; read at scrape time (it changes as banks load)."""
        if max_lora != self.max_lora:
            self.max_lora = max_lora
            self._set_lora_info(*self._lora_banks)

    def watch_residency(self, source) -> None:
        """Read the bank registry's residency counters (``source()`` -> ``ResidencyStats``) at every
        scrape; ``moleserve_banks_loaded`` then is the number of banks resident in host memory."""
        self.residency.source = source

    def set_residency(self) -> None:
        """At scrape time: ``moleserve_banks_loaded`` from the registry (loads and evictions on
        demand change it between bank operations)."""
        if self.residency.source is not None:
            self.banks_loaded.set(self.residency.source().resident.get("host", 0))

    def set_cache_config(self, block_size: int, num_gpu_blocks: int, cache_dtype: str) -> None:
        """The KV cache's shape as vLLM's ``vllm:cache_config_info`` shows it (the endpoint picker's
        prefix-cache scorer reads ``block_size`` and ``num_gpu_blocks``); one series."""
        self.cache_info.clear()
        self.cache_info.labels(str(block_size), str(num_gpu_blocks), cache_dtype).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- internals ---------------------------------------------------------------------------------

    def _set_lora_info(self, running: Iterable[str], waiting: Iterable[str]) -> None:
        self._lora_banks = (tuple(sorted(set(running))), tuple(sorted(set(waiting))))
        labels = (",".join(self._lora_banks[0]), ",".join(self._lora_banks[1]), str(self.max_lora))
        if labels == self._lora_labels:
            return
        # vLLM keeps one series per combination; keeping only the current one bounds the cardinality
        # while readers (the Gateway API extension) still find the newest by its value.
        self.lora_info.clear()
        self.lora_info.labels(*labels).set(time.time())
        self._lora_labels = labels

    def _on_routing(self, routing: RoutingStats) -> None:
        if routing.pool_slots_used is not None:
            self.pool_slots_used.set(routing.pool_slots_used)
        if routing.pool_slots_total is not None:
            self.pool_slots_total.set(routing.pool_slots_total)
        for bank, b in routing.banks.items():
            bank = bank or self.model_name  # None: the served model's own routing (its visual mixture)
            self.routed_tokens.labels(bank).inc(b.tokens)
            self.routing_decisions.labels(bank).inc(b.decisions)
            self.broadcast_decisions.labels(bank).inc(b.broadcast)
            if b.decisions:
                self.broadcast_rate.labels(bank).set(b.broadcast / b.decisions)
            blocks = getattr(b.selections, "blocks", None)
            if blocks is not None:  # SiteCounts: one add per block of sites
                for sites, counts in blocks:
                    self.expert_selections.add_block((bank,), sites, counts)
            elif b.selections:
                self.expert_selections.add((bank,), {(str(layer), target): counts
                                                     for (layer, target), counts in b.selections.items()})
            per_token = _to_list(b.experts_per_decision)
            if per_token:
                counts = [0.0] * (len(EXPERTS_BUCKETS) + 1)
                for k, c in enumerate(per_token):
                    counts[bisect.bisect_left(EXPERTS_BUCKETS, k)] += c
                self.experts_per_token.add_counts((bank,), counts, sum(k * c for k, c in enumerate(per_token)))
            entropy = _to_list(b.entropy_counts)
            if entropy:
                self.routing_entropy.add_counts((bank,), entropy, b.entropy_sum)
