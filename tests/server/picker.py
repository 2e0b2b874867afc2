"""The endpoint picker's view of a model server, in Python: what the Gateway API inference
extension's endpoint picker (the llm-d router, ``pkg/epp/framework/plugins/datalayer/extractor/
metrics/extractor.go`` and ``loraspec.go``, default engine ``vllm``) reads from ``/metrics``, and its
LoRA-affinity scorer (``scorer/loraaffinity/lora_affinity.go``). Used by the tests to check the
metric protocol the way the picker parses it, and by the bank-affinity simulation.

The picker's rules, followed here:
- a gauge's value comes from the family's series with the newest timestamp (none: the first);
  a missing family is an error for queue / running / KV usage / cache info;
- ``vllm:lora_requests_info``: the series with the largest *value* (its value is the time it was
  set); ``running_lora_adapters`` / ``waiting_lora_adapters`` split on "," and trimmed, empty
  names dropped; ``max_lora`` parsed as an integer (a non-integer is an error);
- ``vllm:cache_config_info``: labels ``block_size`` and ``num_gpu_blocks`` parsed as integers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

VLLM = dict(queued="vllm:num_requests_waiting", running="vllm:num_requests_running", kv="vllm:kv_cache_usage_perc",
            lora="vllm:lora_requests_info", cache_info="vllm:cache_config_info")
ENGINE_LABEL = "llm-d.ai/engine-type"  # the pod label the picker picks the metric mapping by
LEGACY_ENGINE_LABEL = "inference.networking.k8s.io/engine-type"


class PickerParseError(ValueError):
    pass


@dataclass
class EndpointMetrics:
    waiting_queue_size: int = 0
    running_requests_size: int = 0
    kv_cache_usage_percent: float = 0.0
    active_models: set[str] = field(default_factory=set)
    waiting_models: set[str] = field(default_factory=set)
    max_active_models: int = 0
    cache_block_size: int = 0
    cache_num_blocks: int = 0


def _families(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        # prometheus_client strips a counter's _total from the family name; the picker keys by the
        # sample name for gauges, which is the family name
        out.setdefault(family.name, []).extend(s for s in family.samples if s.name == family.name)
    return out


def _latest(families: dict[str, list], name: str):
    samples = families.get(name)
    if not samples:
        raise PickerParseError(f"metric family {name!r} not found")
    return max(samples, key=lambda s: s.timestamp or 0)  # max keeps the first of equal timestamps


def _atoi(value: str) -> int:
    if not value.lstrip("-").isdigit():
        raise PickerParseError(f"not an integer: {value!r}")
    return int(value)


def parse(text: str) -> EndpointMetrics:
    """``/metrics`` text as the picker's core metrics extractor turns it into endpoint metrics."""
    fam, m = _families(text), EndpointMetrics()
    m.waiting_queue_size = int(_latest(fam, VLLM["queued"]).value)
    m.running_requests_size = int(_latest(fam, VLLM["running"]).value)
    m.kv_cache_usage_percent = float(_latest(fam, VLLM["kv"]).value)
    lora = fam.get(VLLM["lora"]) or []
    if lora:  # a missing LoRA family is not an error (vLLM without adapters)
        latest = max(lora, key=lambda s: s.value)
        for name, value in latest.labels.items():
            if name == "running_lora_adapters":
                m.active_models = {a.strip() for a in value.split(",") if a.strip()}
            elif name == "waiting_lora_adapters":
                m.waiting_models = {a.strip() for a in value.split(",") if a.strip()}
            elif name == "max_lora" and value != "":
                m.max_active_models = _atoi(value)
    info = _latest(fam, VLLM["cache_info"])
    if info.labels.get("block_size", ""):
        m.cache_block_size = _atoi(info.labels["block_size"])
    if info.labels.get("num_gpu_blocks", ""):
        m.cache_num_blocks = _atoi(info.labels["num_gpu_blocks"])
    return m


def lora_affinity_score(m: EndpointMetrics, target_model: str) -> float:
    """The LoRA-affinity scorer: 1.0 the adapter runs here, 0.8 room for one more adapter, 0.6 the
    adapter waits here, 0.0 full."""
    if target_model in m.active_models:
        return 1.0
    if len(m.active_models) + len(m.waiting_models) < m.max_active_models:
        return 0.8
    if target_model in m.waiting_models:
        return 0.6
    return 0.0
