"""The metrics module from stats objects, and /metrics from a server: names, labels, values, and
every name documented in the README."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families

from server.engine.protocol import RequestStats, StepStats
from server.engine.routing_stats import ENTROPY_BUCKETS, BankRoutingStats, RoutingStats, entropy_bucket_counts
from server.metrics import ServerMetrics

README = Path(__file__).resolve().parents[2] / "README.md"


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def step(**kw) -> StepStats:
    base = dict(time=0.0, duration_s=0.01, num_prefill_tokens=0, num_decode_tokens=1, num_running=3, num_waiting=2,
                kv_blocks_used=25, kv_blocks_total=100)
    return StepStats(**{**base, **kw})


def test_step_and_request_stats():
    m = ServerMetrics("base", max_lora=4)
    m.on_step(step(running_banks=("b", "a", "b"), waiting_banks=("c",), num_preempted=2))
    m.on_request_finished(RequestStats("r1", "a", prompt_tokens=7, completion_tokens=5, finish_reason="stop",
                                       queue_time_s=0.02, ttft_s=0.1, e2e_s=0.6, inter_token_s=[0.01, 0.2, 0.03]))
    m.on_request_finished(RequestStats("r2", None, 3, 0, "abort", 0.0, None, 0.05))
    s = samples(m)
    mn = (("model_name", "base"),)
    assert s[("vllm:num_requests_running", mn)] == 3 and s[("vllm:num_requests_waiting", mn)] == 2
    assert s[("vllm:kv_cache_usage_perc", mn)] == 0.25
    info = [k for k in s if k[0] == "vllm:lora_requests_info"]
    assert info == [("vllm:lora_requests_info", (("max_lora", "4"), ("running_lora_adapters", "a,b"),
                                                  ("waiting_lora_adapters", "c")))]
    assert s[("vllm:prompt_tokens_total", mn)] == 10 and s[("vllm:generation_tokens_total", mn)] == 5
    assert s[("vllm:time_to_first_token_seconds_count", mn)] == 1
    assert s[("vllm:e2e_request_latency_seconds_count", mn)] == 2
    assert s[("moleserve_requests_total", (("bank", "a"), ("finish_reason", "stop")))] == 1
    assert s[("moleserve_requests_total", (("bank", "base"), ("finish_reason", "abort")))] == 1
    assert s[("moleserve_generation_tokens_total", (("bank", "a"),))] == 5
    assert s[("moleserve_preemptions_total", ())] == 2
    it = "vllm:iteration_tokens_total"  # vLLM's tokens-per-step histogram: its count is the engine's steps
    assert s[(it + "_count", mn)] == 1 and s[(it + "_sum", mn)] == 1
    m.on_step(step(num_prefill_tokens=300, num_decode_tokens=20))
    m.on_step(step(num_decode_tokens=0))  # an idle step (nothing scheduled) is no iteration
    s = samples(m)
    assert s[(it + "_count", mn)] == 2 and s[(it + "_sum", mn)] == 321
    assert s[(it + "_bucket", (("le", "256.0"),) + mn)] == 1 and s[(it + "_bucket", (("le", "512.0"),) + mn)] == 2
    itl = "moleserve_inter_token_latency_seconds"
    assert s[(itl + "_count", (("bank", "a"),))] == 3
    assert s[(itl + "_bucket", (("bank", "a"), ("le", "0.01")))] == 1
    assert s[(itl + "_bucket", (("bank", "a"), ("le", "0.05")))] == 2
    assert abs(s[(itl + "_sum", (("bank", "a"),))] - 0.24) < 1e-9
    assert s[("vllm:prefix_cache_queries_total", mn)] == 0 and s[("vllm:prefix_cache_hits_total", mn)] == 0
    m.on_step(step(prefix_cache_queries=900, prefix_cache_hits=640))
    m.on_step(step(prefix_cache_queries=100, prefix_cache_hits=0))
    assert samples(m)[("vllm:prefix_cache_queries_total", mn)] == 1000
    assert samples(m)[("vllm:prefix_cache_hits_total", mn)] == 640
    # the info series is replaced, not accumulated
    m.on_step(step())
    assert len([k for k in samples(m) if k[0] == "vllm:lora_requests_info"]) == 1


def test_routing_stats_from_tensors():
    m = ServerMetrics("base")
    entropy = torch.tensor([0.01, 0.5, 0.97, 1.0])
    routing = RoutingStats(pool_slots_used=5, pool_slots_total=16, banks={"d": BankRoutingStats(
        tokens=4, decisions=8, broadcast=2,
        selections={(0, "q_proj"): torch.tensor([3, 0, 5]), (1, "mlp"): [1, 1, 0]},
        experts_per_decision=torch.tensor([0, 4, 2, 2]),  # 4 decisions with 1 expert, 2 with 2, 2 with 3
        entropy_counts=entropy_bucket_counts(entropy), entropy_sum=float(entropy.sum()))})
    m.on_step(step(routing=routing))
    m.on_step(step(routing=routing))
    s = samples(m)
    d = (("bank", "d"),)
    assert s[("moleserve_routed_tokens_total", d)] == 8
    assert s[("moleserve_routing_decisions_total", d)] == 16
    assert s[("moleserve_broadcast_decisions_total", d)] == 4
    assert s[("moleserve_broadcast_rate", d)] == 0.25
    sel = "moleserve_expert_selections_total"
    assert s[(sel, (("bank", "d"), ("expert", "2"), ("layer", "0"), ("target", "q_proj")))] == 10
    assert (sel, (("bank", "d"), ("expert", "1"), ("layer", "0"), ("target", "q_proj"))) not in s  # zero: no series
    assert s[("moleserve_pool_slots_in_use", ())] == 5 and s[("moleserve_pool_slots_total", ())] == 16
    ept = "moleserve_experts_per_token"
    assert s[(ept + "_count", d)] == 16 and s[(ept + "_sum", d)] == 2 * (4 + 4 + 6)
    assert s[(ept + "_bucket", d + (("le", "1.0"),))] == 8
    ent = "moleserve_routing_entropy"
    assert s[(ent + "_count", d)] == 8
    assert s[(ent + "_bucket", d + (("le", "0.05"),))] == 2
    assert s[(ent + "_bucket", d + (("le", "0.95"),))] == 4
    assert s[(ent + "_bucket", d + (("le", "1.0"),))] == 8
    assert len(entropy_bucket_counts(entropy)) == len(ENTROPY_BUCKETS) + 1


def test_bank_operations_and_rejections():
    m = ServerMetrics("base")
    m.on_bank_operation("load", 0.3, ok=True, banks_loaded=2)
    m.on_bank_operation("unload", 0.01, ok=False)
    m.on_rejected("overloaded")
    s = samples(m)
    assert s[("moleserve_bank_events_total", (("action", "load"), ("result", "ok")))] == 1
    assert s[("moleserve_bank_events_total", (("action", "unload"), ("result", "error")))] == 1
    assert s[("moleserve_bank_operation_duration_seconds_count", (("action", "load"),))] == 1
    assert s[("moleserve_banks_loaded", ())] == 2
    assert s[("moleserve_rejected_requests_total", (("reason", "overloaded"),))] == 1


def test_served_metrics_from_the_fake_engine(served, tmp_path):
    (tmp_path / "b").mkdir()
    with served.client() as c:
        served.banks.loaded["b"] = type("B", (), {})()
        served.banks.loaded["b"].__dict__.update(name="b", kind="dynmole", num_experts=4)
        assert c.post("/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": 3}).status_code == 200
        r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'moleserve_requests_total{bank="b",finish_reason="length"} 1.0' in text
    assert 'moleserve_expert_selections_total{bank="b",expert="1",layer="0",target="q"}' in text
    assert "moleserve_routing_entropy_bucket" in text and "_created" not in text


def test_every_metric_name_is_documented_in_the_readme():
    m = ServerMetrics("base")
    m.on_step(step(routing=RoutingStats(banks={"d": BankRoutingStats(1, 1, 1, {(0, "q"): [1]}, [0, 1], [1], 0.1)})))
    m.on_request_finished(RequestStats("r", None, 1, 1, "stop", 0.0, 0.1, 0.2, [0.1]))
    m.on_bank_operation("load", 0.1, ok=True)
    m.on_rejected("overloaded")
    from adapters.runtime.residency import ResidencyStats

    m.watch_residency(ResidencyStats)  # the bank registry's residency series (read at scrape)
    names = {f.name + ("_total" if f.type == "counter" else "")
             for f in text_string_to_metric_families(m.render().decode())}
    readme = README.read_text()
    assert "## Metrics" in readme
    section = readme.split("## Metrics", 1)[1]
    documented = set(re.findall(r"`((?:vllm:|moleserve_)[a-z0-9_:]+)`", section))
    assert names - documented == set(), f"undocumented: {sorted(names - documented)}"
    assert documented - names == set(), f"documented but not exported: {sorted(documented - names)}"


def test_expert_selections_accumulate_over_steps_of_different_sites():
    m = ServerMetrics("base")
    first = {(0, "q_proj"): torch.tensor([1, 0, 2]), (1, "mlp"): torch.tensor([0, 1, 1, 4])}  # MoLA: 3 and 4 experts
    second = {(0, "q_proj"): [2, 0, 0], (2, "v_proj"): [0, 5, 0]}
    for sel in (first, second):
        m.on_step(step(routing=RoutingStats(banks={"d": BankRoutingStats(tokens=1, decisions=1, selections=sel)})))
    s = samples(m)
    name = "moleserve_expert_selections_total"

    def key(layer, target, expert):
        return (name, (("bank", "d"), ("expert", str(expert)), ("layer", str(layer)), ("target", target)))

    assert s[key(0, "q_proj", 0)] == 3 and s[key(0, "q_proj", 2)] == 2 and key(0, "q_proj", 1) not in s
    assert s[key(1, "mlp", 3)] == 4 and s[key(2, "v_proj", 1)] == 5
    assert len([k for k in s if k[0] == name]) == 6


def test_expert_selections_from_site_blocks_and_dicts_add_up():
    """``SiteCounts`` (the C++ decode path's blocks of rows) and plain dicts land in the same series."""
    from server.engine.routing_stats import SiteCounts

    m = ServerMetrics("base")
    sites = ((0, "gate_proj"), (0, "up_proj"), (1, "down_proj"))
    block = SiteCounts([(sites, torch.tensor([[1, 0, 2], [0, 3, 0], [4, 0, 0]]))])
    assert dict(block).keys() == set(sites) and torch.equal(block[(0, "up_proj")], torch.tensor([0, 3, 0]))
    for sel in (block, {(0, "gate_proj"): [1, 1, 0]}, block):
        m.on_step(step(routing=RoutingStats(banks={"d": BankRoutingStats(tokens=1, decisions=1, selections=sel)})))
    s = samples(m)

    def key(layer, target, expert):
        return ("moleserve_expert_selections_total", (("bank", "d"), ("expert", str(expert)), ("layer", str(layer)),
                                                       ("target", target)))

    assert s[key(0, "gate_proj", 0)] == 3 and s[key(0, "gate_proj", 1)] == 1 and s[key(0, "gate_proj", 2)] == 4
    assert s[key(0, "up_proj", 1)] == 6 and s[key(1, "down_proj", 0)] == 8
    assert key(0, "up_proj", 0) not in s
