"""Routing statistics travel from the adapter step to the stats sink once per step."""

from __future__ import annotations

from adapters.runtime import BankRegistry
from server.engine.routing_stats import RoutingStats
from tests.adapters.bank_builders import fingerprint_of, random_bank
from tests.runtime.helpers import greedy_request, make_engine
from tests.stats_sink import RecordingSink


def test_step_stats_carry_routing_of_banks_in_the_batch(tiny_model_dir):
    engine = make_engine(tiny_model_dir, None)
    registry = BankRegistry(engine.model_config)
    registry.add(random_bank("dynmole", fingerprint_of(tiny_model_dir), r=4, experts_per_layer=(4, 4), seed=3,
                             name="dyn"))
    engine.set_adapter_provider(registry)
    sink = RecordingSink()
    engine.set_stats_sink(sink)
    engine.generate([greedy_request("a", [5, 6, 7, 8], "dyn", 3), greedy_request("b", [9, 10], None, 3)])
    routed = [s.routing for s in sink.steps if s.routing is not None and s.routing.banks]
    assert len(routed) == 3  # one prefill step and two decode steps, each with the bank's token(s)
    first = routed[0]
    assert isinstance(first, RoutingStats)
    assert set(first.banks) == {"dyn"}
    assert first.banks["dyn"].tokens == 4  # the prompt; the base request's tokens are not counted
    assert routed[1].banks["dyn"].tokens == 1
    assert first.pool_slots_used == registry.pool.slots_used > 0
    # base-only steps report no routing work
    engine.generate([greedy_request("c", [1, 2], None, 2)])
    assert all(not s.routing or not s.routing.banks for s in sink.steps[-2:])
