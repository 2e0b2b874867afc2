"""A fault inside one bank's work, or one request's non-finite logits, costs only those requests:
the bank is taken out of service (listed as failed, reloadable) and the step's other sequences are
re-run and answered as if nothing had happened."""

from __future__ import annotations

import pytest

from adapters.runtime import BankRegistry
from adapters.runtime.registry import BankOutOfService
from server.model import ModelConfig
from tests.adapters.bank_builders import fingerprint_of, random_bank
from tests.runtime.helpers import greedy_request, make_engine, tokens_of


def _registry(model_dir) -> BankRegistry:
    reg = BankRegistry(ModelConfig.from_folder(model_dir))
    base = fingerprint_of(model_dir)
    reg.add(random_bank("dynmole", base, r=4, experts_per_layer=(3,), seed=1, name="good"))
    reg.add(random_bank("mixlora", base, r=4, experts_per_layer=(3,), seed=2, name="bad"))
    return reg


def _break(reg: BankRegistry, name: str) -> None:
    # A fault inside the bank's work at run time (what an unknown activation did before load-time checks).
    reg._current[name].layout.act_fn = "no-such-activation"


PROMPTS = {"base": [5, 6, 7, 8, 9], "good": [11, 12, 13, 14], "bad1": [21, 22, 23], "bad2": [31, 32, 33, 34, 35, 36]}
BANK = {"base": None, "good": "good", "bad1": "bad", "bad2": "bad"}


def _requests(names):
    return [greedy_request(n, PROMPTS[n], BANK[n], 4) for n in names]


def test_a_failing_bank_fails_only_its_requests(tiny_model_dir):
    reference = make_engine(tiny_model_dir, _registry(tiny_model_dir)).generate(_requests(["base", "good"]))
    reg = _registry(tiny_model_dir)
    _break(reg, "bad")
    engine = make_engine(tiny_model_dir, reg)
    out = engine.generate(_requests(["base", "good", "bad1", "bad2"]))
    for name in ("base", "good"):  # re-run, not failed: the same tokens as without the broken bank
        assert out[name][-1].finish_reason == "length"
        assert tokens_of(out[name]) == tokens_of(reference[name])
    for name in ("bad1", "bad2"):
        (last,) = out[name]
        assert last.finish_reason == "error" and "bank 'bad'" in last.error and "out of service" in last.error
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    listed = {b["name"]: b for b in reg.list()}
    assert listed["bad"]["state"] == "failed" and "no-such-activation" in listed["bad"]["error"]
    assert listed["good"]["state"] == "ready"
    with pytest.raises(BankOutOfService, match="bad.*out of service") as info:
        reg.acquire("bad")
    assert info.value.status == 503
    # reloading puts it back in service
    reg.add(random_bank("mixlora", fingerprint_of(tiny_model_dir), r=4, experts_per_layer=(3,), seed=2, name="bad"))
    again = engine.generate(_requests(["bad1"]))
    assert again["bad1"][-1].finish_reason == "length" and len(tokens_of(again["bad1"])) == 4
    assert {b["name"]: b["state"] for b in reg.list()} == {"good": "ready", "bad": "ready"}


def test_base_model_fault_isolated_to_its_request(make_engine, monkeypatch):
    engine = make_engine()
    real = engine.runner.run

    def run(batch, adapters=None):  # a fault that one request's tokens trigger
        if any(s.request_id == "poison" for s in batch.seqs):
            raise RuntimeError("poisoned")
        return real(batch, adapters)

    monkeypatch.setattr(engine.runner, "run", run)
    reqs = [greedy_request(n, PROMPTS[n], None, 3) for n in ("base", "good")]
    reqs.insert(1, greedy_request("poison", [3, 4, 5], None, 3))
    out = engine.generate(reqs)
    assert out["poison"][-1].finish_reason == "error" and "poisoned" in out["poison"][-1].error
    assert [len(tokens_of(out[n])) for n in ("base", "good")] == [3, 3]


class _NaNFirstRow:
    """The model, with the first sampled row's logits NaN (what an overflowing bank produces), or
    another edit of its logits (``edit(logits)``)."""

    def __init__(self, model, edit=None):
        self.model, self.edit = model, edit

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, ids):
        logits = self.model(ids).clone()
        if self.edit is None:
            logits[0] = float("nan")
        else:
            self.edit(logits)
        return logits


def _edit_huge_then_inf(logits):
    logits[0, :8] = 1e38  # finite (fp32 holds 3.4e38), but the row's sum overflows: not a fault
    logits[1, 3] = float("-inf")  # one infinite logit: a fault


def test_one_infinite_logit_is_a_fault_and_huge_finite_logits_are_not(make_engine):
    engine = make_engine()
    engine.add_request(greedy_request("huge", [5, 6, 7], None, 3))
    engine.add_request(greedy_request("inf", [8, 9, 10], None, 3))
    engine.runner.model = _NaNFirstRow(engine.model, _edit_huge_then_inf)
    events = {e.request_id: e for e in engine.step()}
    engine.runner.model = engine.model
    assert events["inf"].finished and "NaN or infinite logits" in events["inf"].error
    assert not events["huge"].finished and len(events["huge"].token_ids) == 1


def test_non_finite_logits_end_that_sequence_with_an_error(make_engine):
    engine = make_engine()
    engine.add_request(greedy_request("nan", [5, 6, 7], None, 3))
    engine.add_request(greedy_request("ok", [8, 9, 10], None, 3))
    engine.runner.model = _NaNFirstRow(engine.model)
    events = {e.request_id: e for e in engine.step()}
    engine.runner.model = engine.model
    assert events["nan"].finished and events["nan"].finish_reason == "error"
    assert "NaN or infinite logits" in events["nan"].error and not events["nan"].token_ids
    assert not events["ok"].finished and len(events["ok"].token_ids) == 1
    rest = engine.generate([])
    assert "nan" not in engine.sequences and sum(len(e.token_ids) for e in rest.get("ok", [])) == 2
