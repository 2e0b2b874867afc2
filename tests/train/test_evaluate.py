"""The evaluator: parsing, the papers' answer extraction on hand-made generations, both modes."""

from __future__ import annotations

import json

import pytest

from adapters.evaluate import LocalRunner, evaluate_set, extract_answer, format_table, parse_item, summary
from adapters.evaluate.tasks import set_name

from .conftest import RECORDS


@pytest.mark.parametrize("generation, family, expected", [
    ("the correct answer is answer3", "answer", "answer3"),
    ("answer2 is wrong, the correct answer is answer4", "answer", "answer2"),  # first occurrence wins
    ("### Response:\nthe correct answer is answer1</s>", "answer", "answer1"),
    ("Answer1 looks right", "answer", ""),  # case-sensitive, as in the papers
    ("I think it is True, i.e. true", "truefalse", "true"),
    ("false. Well, true", "truefalse", "false"),
    ("the statement is untrue", "truefalse", "true"),  # substring match, as the papers' regex
    ("no idea", "truefalse", ""),
    ("option2", "option", "option2"),
    ("solution1 then solution2", "solution", "solution1"),
    ("ending4", "ending", "ending4"),
    ("answer5", "answer", "answer5"),
])
def test_answer_extraction(generation, family, expected):
    assert extract_answer(generation, family) == expected


def test_parse_item_reads_choices_from_the_answer_format():
    item = parse_item(RECORDS[0])
    assert item.answer == "answer2" and item.family == "answer"
    assert item.choices == ("answer1", "answer2", "answer3", "answer4")
    assert item.prompt.startswith("Below is an instruction") and item.prompt.endswith("### Response:\n")
    assert parse_item(RECORDS[1]).choices == ("true", "false")
    assert set_name("/x/commonsense/ARC-Easy/test.json") == "ARC-Easy"


class FixedGenerator:
    """Replays canned generations and records the stop callback's verdicts."""

    def __init__(self, tok, texts):
        self.tok, self.texts = tok, texts

    def generate(self, prompts, max_tokens, done=None):
        outs = []
        for text in self.texts[:len(prompts)]:
            ids = self.tok(text)["input_ids"]
            cut = next((k for k in range(1, len(ids) + 1) if done and done(ids[:k])), len(ids))
            outs.append(ids[:cut])
        self.texts = self.texts[len(prompts):]
        return outs


def test_generate_mode_scores_extracted_answers(tiny_tokenizer):
    items = [parse_item(r) for r in RECORDS]
    # Items are generated family by family (answer first, then truefalse).
    texts = ["the correct answer is answer2 or answer1", "answer1", "the correct answer is true", "hmm"]
    res = evaluate_set("mix", items, tiny_tokenizer, mode="generate", generator=FixedGenerator(tiny_tokenizer, texts))
    assert res.predictions == ["answer2", "true", "answer1", ""]
    assert res.correct == 2 and res.unanswered == 1 and res.accuracy == 0.5


def test_loglik_mode_on_the_tiny_model_matches_full_sequence_scoring(tiny_model, tiny_tokenizer):
    import torch
    import torch.nn.functional as F

    from server.model import SequenceKVCache, StepContext, step_context

    items = [parse_item(r) for r in RECORDS]
    runner = LocalRunner(tiny_model, batch_size=3)
    res = evaluate_set("mix", items, tiny_tokenizer, mode="loglik", scorer=runner)
    for item, pred in zip(items, res.predictions):
        scores = []
        for c in item.choices:  # the slow way: each full sequence alone
            prompt = tiny_tokenizer(item.prompt)["input_ids"]
            resp = tiny_tokenizer("the correct answer is " + c)["input_ids"]
            ids = torch.tensor(prompt + resp)
            cache = SequenceKVCache(tiny_model.config)
            attn = cache.step([0], [len(ids)])
            with torch.no_grad(), step_context(StepContext(positions=attn.positions(), attention=attn)):
                logp = F.log_softmax(tiny_model(ids), -1)
            scores.append(sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(resp)))
        assert pred == item.choices[max(range(len(scores)), key=scores.__getitem__)]


def _set_and_bank(tiny_model_dir, tmp_path):
    """A test set ``mini`` of RECORDS and a bank trained one step on it (the CLI tests' inputs)."""
    from adapters.train import TrainConfig, train

    data = tmp_path / "mini" / "test.json"
    data.parent.mkdir()
    data.write_text(json.dumps(RECORDS))
    bank = tmp_path / "bank"
    train(TrainConfig(data=[str(data)], out=str(bank), model=str(tiny_model_dir), experts=2, rank=2, max_steps=1,
                      batch_size=4, progress=False))
    return data, bank


def test_generate_mode_through_the_local_runner_and_cli(tiny_model_dir, tmp_path, capsys):
    from server.cli import main

    data, bank = _set_and_bank(tiny_model_dir, tmp_path)
    (tmp_path / "r.json").write_text(json.dumps(RECORDS[1:]))
    out = tmp_path / "report.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--bank", str(bank), "--data", str(data), "--data", str(tmp_path / "r.json"),
                 "--limit", "3", "--max-tokens", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert 0 <= report["accuracy"] <= 1 and report["sets"]["mini"]["n"] == 3 and report["sets"]["r"]["n"] == 3
    assert "average" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--mode", "loglik"]) == 0


def test_table_and_summary():
    from adapters.evaluate.runner import SetResult

    rs = [SetResult("a", "loglik", 4, 3, 1.0), SetResult("b", "loglik", 2, 0, 1.0)]
    assert "37.5%" in format_table(rs)
    assert summary(rs)["accuracy"] == pytest.approx(0.375)


@pytest.mark.parametrize("kind", ["dynmole", "mixlora", "lora"])
def test_engine_and_local_runner_agree_on_a_trained_bank(kind, tiny_model, tiny_tokenizer, train_file, tiny_model_dir,
                                                        tmp_path):
    """The serving engine runs a trained bank as the trainer does: same greedy tokens."""
    from adapters import load_bank
    from adapters.evaluate import EngineGenerator
    from adapters.train import TrainConfig, train

    train(TrainConfig(data=[str(train_file)], out=str(tmp_path / kind), model=str(tiny_model_dir), kind=kind,
                      experts=3, rank=4, max_steps=3, batch_size=4, lr=2e-2, progress=False),
          tokenizer=tiny_tokenizer, model=tiny_model)
    bank = load_bank(tmp_path / kind)
    prompts = [tiny_tokenizer(parse_item(r).prompt)["input_ids"] for r in RECORDS]
    local = LocalRunner(tiny_model, bank).generate(prompts, 6)
    served = EngineGenerator(tiny_model, tiny_tokenizer, bank).generate(prompts, 6)
    base = LocalRunner(tiny_model).generate(prompts, 6)
    assert served == local
    assert local != base  # the bank changes what is generated
    # log-likelihood scoring: the engine's prompt log-probabilities equal the local forward's
    prefix = [p[:-2] for p in prompts]
    conts = [[p[-2:], p[-1:], [5, 6, 7]] for p in prompts]
    engine_scores = EngineGenerator(tiny_model, tiny_tokenizer, bank).score(prefix, conts)
    local_scores = LocalRunner(tiny_model, bank).score(prefix, conts)
    for e, loc in zip(engine_scores, local_scores):
        assert e == pytest.approx(loc, abs=1e-3)


def test_engine_scores_a_trained_bank_in_the_served_pool_dtypes(tiny_model, tiny_tokenizer, train_file, tiny_model_dir,
                                                               tmp_path):
    """``moleserve eval --bank-dtype``: the engine runner stores the bank's experts as ``serve`` would
    (float16, or int8 with row scales); the scores stay near the float32 pool's, and do change."""
    import torch

    from adapters import load_bank
    from adapters.evaluate import EngineGenerator
    from adapters.train import TrainConfig, train

    train(TrainConfig(data=[str(train_file)], out=str(tmp_path / "dyn"), model=str(tiny_model_dir), kind="dynmole",
                      experts=3, rank=4, max_steps=3, batch_size=4, lr=2e-2, progress=False),
          tokenizer=tiny_tokenizer, model=tiny_model)
    bank = load_bank(tmp_path / "dyn")
    prompts = [tiny_tokenizer(parse_item(r).prompt)["input_ids"] for r in RECORDS]
    prefix = [p[:-2] for p in prompts]
    conts = [[p[-2:], p[-1:], [5, 6, 7]] for p in prompts]
    scores = {dt: EngineGenerator(tiny_model, tiny_tokenizer, bank, bank_dtype=dt).score(prefix, conts)
              for dt in (None, torch.float16, torch.int8)}
    ref = [s for item in scores[None] for s in item]
    for dt, tol in ((torch.float16, 1e-2), (torch.int8, 1e-1)):
        got = [s for item in scores[dt] for s in item]
        assert got == pytest.approx(ref, abs=tol), dt
    assert [s for item in scores[torch.int8] for s in item] != ref  # the int8 pool is in use


def test_eval_cli_scores_with_the_int8_pool(tiny_model_dir, tmp_path, capsys):
    from server.cli import main

    data, bank = _set_and_bank(tiny_model_dir, tmp_path)
    out = tmp_path / "report.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--bank", str(bank), "--data", str(data), "--mode", "loglik",
                 "--bank-dtype", "int8", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["sets"]["mini"]["n"] == len(RECORDS)
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--bank-dtype", "int4"])
    assert "invalid choice" in capsys.readouterr().err
