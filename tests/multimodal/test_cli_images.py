"""Images from the command line and the release's prompt limit: ``moleserve generate --image``,
``moleserve eval`` on a LLaVA-format image question set (exact match), and image prompts over the
checkpoint's ``tokenizer_model_max_length`` refused (engine and HTTP) instead of truncated."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch

from server.cli import main
from server.engine.protocol import GenerationRequest, InvalidRequest, SamplingParams

from .builders import TOKENS_PER_IMAGE, pad_and_process, random_image
from .helpers import image_request, make_engine, tokens_of

QUESTION = "What is in the picture?"


def _release_pieces(tok, question: str) -> tuple[list[int], list[int]]:
    """The chat template's prompt for one user turn "<image>\\n{question}", split at the marker and
    tokenised in pieces (no special tokens): the release's construction, written out here."""
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + question}], add_generation_prompt=True,
                                   tokenize=False)
    before, after = text.split("<image>")
    return (list(tok(before, add_special_tokens=False)["input_ids"]),
            list(tok(after, add_special_tokens=False)["input_ids"]))


def _reference_answer(parrot_dir, parrot_model, tok, tower_dir, image, question, max_tokens) -> list[int]:
    engine = make_engine(parrot_dir, parrot_model, tokenizer=tok)
    before, after = _release_pieces(tok, question)
    pixels = pad_and_process(image, tower_dir)
    engine.add_request(image_request("ref", before, after, pixels, "h", TOKENS_PER_IMAGE,
                                     engine.multimodal_spec.placeholder_token_id, max_tokens=max_tokens,
                                     ignore_eos=False))
    out = []
    while engine.has_unfinished():
        out += tokens_of(engine.step())
    return out


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed in range(3):
        path = folder / f"img{seed}.png"
        random_image(seed, size=(50 - 10 * seed, 30 + 5 * seed)).save(path)
        paths.append(path)
    return paths


def test_generate_with_an_image_answers_as_the_engine_on_the_release_prompt(capsys, parrot_dir, parrot_model,
                                                                            parrot_tokenizer, tower_dir, image_files):
    from PIL import Image

    code = main(["generate", "--model", str(parrot_dir), "--image", str(image_files[0]), QUESTION, "--max-tokens", "5"])
    out = capsys.readouterr()
    assert code == 0, out.err
    want = _reference_answer(parrot_dir, parrot_model, parrot_tokenizer, tower_dir,
                             Image.open(image_files[0]).convert("RGB"), QUESTION, 5)
    assert want and out.out.rstrip("\n") == parrot_tokenizer.decode(want, skip_special_tokens=True)


def test_generate_image_refusals_are_one_line(capsys, tmp_path, parrot_dir, tiny_model_dir, image_files):
    def run(*argv):
        code = main(["generate", *argv, "hi", "--max-tokens", "2"])
        return code, capsys.readouterr().err

    code, err = run("--model", str(tiny_model_dir), "--image", str(image_files[0]))
    assert code == 2 and "vision tower" in err and len(err.strip().splitlines()) == 1
    code, err = run("--model", str(parrot_dir), "--image", str(tmp_path / "missing.png"))
    assert code == 2 and "missing.png" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code, err = run("--model", str(parrot_dir), "--image", str(tmp_path / "bad.png"))
    assert code == 2 and "cannot be decoded" in err and len(err.strip().splitlines()) == 1


def _write_set(folder, records):
    path = folder / "vqa.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def test_eval_scores_an_image_question_set_by_exact_match(capsys, tmp_path, parrot_dir, parrot_model,
                                                          parrot_tokenizer, tower_dir, image_files):
    from PIL import Image

    for p in image_files:
        shutil.copy(p, tmp_path / p.name)
    questions = ["What is in the picture?", "Qual é a cor?", "图中是什么？"]
    answers = [parrot_tokenizer.decode(_reference_answer(parrot_dir, parrot_model, parrot_tokenizer, tower_dir,
                                                         Image.open(p).convert("RGB"), q, 3), skip_special_tokens=True)
               for p, q in zip(image_files, questions)]
    gold = ["  " + answers[0].strip().upper() + ".",  # normalised: case, spaces and the final stop do not count
            answers[1].strip(),
            "certainly not " + answers[2]]  # wrong
    records = [{"id": str(i), "image": p.name, "language": lang, "task": "t",
                "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": g}]}
               for i, (p, q, g, lang) in enumerate(zip(image_files, questions, gold, ["en", "pt", "en"]))]
    data = _write_set(tmp_path, records)
    report = tmp_path / "report.json"
    code = main(["eval", "--model", str(parrot_dir), "--data", str(data), "--max-tokens", "3", "--json", str(report)])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(report.read_text())["sets"]["vqa"]
    assert result["mode"] == "exact" and result["n"] == 3 and result["correct"] == 2
    assert [p.strip() for p in result["predictions"]] == [a.strip() for a in answers]
    assert result["groups"]["en"] == {"accuracy": 0.5, "correct": 1, "n": 2}
    assert result["groups"]["pt/t"]["correct"] == 1
    assert "66.7%" in out.out

    # the same question set with the images elsewhere: --image-folder
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(data), moved / "vqa.json")
    code = main(["eval", "--model", str(parrot_dir), "--data", str(moved / "vqa.json"), "--image-folder", str(tmp_path),
                 "--max-tokens", "3", "--limit", "1"])
    assert code == 0, capsys.readouterr().err


def test_eval_image_set_refusals(capsys, tmp_path, parrot_dir, tiny_model_dir, image_files):
    shutil.copy(image_files[0], tmp_path / "a.png")
    record = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}

    def run(model, records, *extra):
        data = _write_set(tmp_path, records)
        code = main(["eval", "--model", str(model), "--data", str(data), "--max-tokens", "2", *extra])
        return code, capsys.readouterr().err

    code, err = run(tiny_model_dir, [record])
    assert code == 2 and "vision tower" in err
    code, err = run(parrot_dir, [record], "--runner", "local")
    assert code == 2 and "--runner local" in err
    code, err = run(parrot_dir, [{**record, "image": "nope.png"}])
    assert code == 2 and "nope.png" in err and "not found" in err
    code, err = run(parrot_dir, [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}])
    assert code == 2 and "gpt turn" in err


def _with_max_length(tmp_path, parrot_dir, limit: int):
    folder = shutil.copytree(parrot_dir, tmp_path / "p")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["tokenizer_model_max_length"] = limit
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_image_prompts_over_tokenizer_model_max_length_are_refused_not_truncated(tmp_path, parrot_dir,
                                                                                parrot_tokenizer):
    from server.model.parrot import load_model_with_vision

    tok = parrot_tokenizer
    before, after = _release_pieces(tok, QUESTION)
    n = len(before) + TOKENS_PER_IMAGE + len(after)
    folder = _with_max_length(tmp_path, parrot_dir, n)  # exactly this prompt fits, as in the release
    engine = make_engine(folder, load_model_with_vision(folder), tokenizer=tok)
    spec = engine.multimodal_spec
    pixels = torch.zeros(3, *spec.processor.output_size)
    ph = spec.placeholder_token_id
    engine.add_request(image_request("fits", before, after, pixels, "h", TOKENS_PER_IMAGE, ph, max_tokens=3))
    with pytest.raises(InvalidRequest) as over:
        engine.add_request(image_request("over", before, after + after[-1:], pixels, "h", TOKENS_PER_IMAGE, ph))
    assert over.value.code == "context_length_exceeded" and over.value.param == "messages"
    assert "tokenizer_model_max_length" in str(over.value) and f"{n} tokens" in str(over.value)
    # a text prompt is not limited by it (the release truncates only prompts with an image)
    engine.add_request(GenerationRequest("text", before + after + after, SamplingParams(max_tokens=2)))
    got = {}
    while engine.has_unfinished():
        for e in engine.step():
            got.setdefault(e.request_id, []).append(e)
    assert len(tokens_of(got["fits"])) == 3 and got["text"][-1].finish_reason != "error"


def test_over_long_image_prompt_is_a_400_over_http(tmp_path, parrot_dir, parrot_tokenizer, image_files):
    """The chat API returns the engine's refusal as an OpenAI 400 naming the limit; another request is unaffected."""
    import base64

    from server.api.app import create_app
    from server.engine.async_engine import AsyncEngine
    from server.model.parrot import load_model_with_vision
    from server.settings import Settings
    from tests.server.conftest import ServerThread

    folder = _with_max_length(tmp_path, parrot_dir, 60)
    llm = make_engine(folder, load_model_with_vision(folder), tokenizer=parrot_tokenizer)
    url = "data:image/png;base64," + base64.b64encode(image_files[0].read_bytes()).decode()

    def body(question):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": question}]}], "max_tokens": 2}

    with ServerThread(create_app(Settings(), AsyncEngine(llm.config, engine=llm))) as st, \
            httpx.Client(base_url=f"http://127.0.0.1:{st.port}", timeout=60) as c:
        short = c.post("/v1/chat/completions", json=body("Hi?"))
        long = c.post("/v1/chat/completions", json=body("Describe it, please. " * 20))
        assert short.status_code == 200, short.text
        assert long.status_code == 400, long.text
        err = long.json()["error"]
        assert "tokenizer_model_max_length" in err["message"] and "60" in err["message"]
        assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error"
        assert c.post("/v1/chat/completions", json=body("Hi?")).status_code == 200


def test_serve_builds_a_parrot_checkpoint_and_answers_image_and_text_chats(parrot_dir, parrot_tokenizer, image_files):
    """``moleserve serve --model <parrot>``'s engine and app (build_engine: what `serve` runs before
    the port opens): an image chat and a text chat both answered; the image's positions in usage."""
    import base64

    from server.api.app import create_app
    from server.commands.serve import build_engine
    from server.settings import Settings
    from tests.server.conftest import ServerThread

    settings = Settings(model=str(parrot_dir), kv_cache_memory=16 << 20, max_num_seqs=4, dtype="float32")
    engine, banks = build_engine(settings)
    url = "data:image/png;base64," + base64.b64encode(image_files[1].read_bytes()).decode()
    with ServerThread(create_app(settings, engine, banks)) as st, \
            httpx.Client(base_url=f"http://127.0.0.1:{st.port}", timeout=60) as c:
        image = c.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]})
        text = c.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert image.status_code == 200 and text.status_code == 200, (image.text, text.text)
    before, after = _release_pieces(parrot_tokenizer, QUESTION)
    assert image.json()["usage"]["prompt_tokens"] == len(before) + TOKENS_PER_IMAGE + len(after)


def test_serve_refuses_a_hub_tower_before_the_port_opens(capsys, tmp_path, parrot_dir):
    folder = shutil.copytree(parrot_dir, tmp_path / "p")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (folder / "config.json").write_text(json.dumps(cfg))
    code = main(["serve", "--model", str(folder), "--port", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--vision-tower" in err and len(err.splitlines()) == 1


def test_generation_stops_at_im_end_as_released(tmp_path, parrot_dir, parrot_tokenizer, tiny_model_dir):
    """The release stops at <|im_end|> whatever config.json's eos_token_id names (Qwen's base
    config names <|endoftext|>); a text-only model keeps its own EOS ids only."""
    from server.engine.llm_engine import load_tokenizer
    from server.model.parrot import load_model_with_vision

    vocab = parrot_tokenizer.get_vocab()
    im_end, endoftext = vocab["<|im_end|>"], vocab["<|endoftext|>"]
    folder = shutil.copytree(parrot_dir, tmp_path / "p")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["eos_token_id"] = endoftext
    (folder / "config.json").write_text(json.dumps(cfg))
    engine = make_engine(folder, load_model_with_vision(folder), tokenizer=parrot_tokenizer)
    assert set(engine.eos_token_ids) == {endoftext, im_end}
    text_only = make_engine(tiny_model_dir, load_model_with_vision(tiny_model_dir), tokenizer=load_tokenizer(tiny_model_dir))
    assert tuple(text_only.eos_token_ids) == tuple(text_only.model_config.eos_token_ids)


def test_eval_image_set_through_a_parrot_bank_on_a_tower_only_base(capsys, tmp_path, tiny_model_dir, tower_dir,
                                                                    image_files):
    from tests.adapters.bank_builders import fingerprint_of
    from tests.parrot.test_bank import parrot_bank

    from .builders import TOWER

    bank, _ = parrot_bank(fingerprint_of(tiny_model_dir), mm=TOWER["hidden_size"], tokens=TOKENS_PER_IMAGE, name="pb")
    bank.save(tmp_path / "pb")
    shutil.copy(image_files[0], tmp_path / "a.png")
    data = _write_set(tmp_path, [{"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}])
    argv = ["eval", "--model", str(tiny_model_dir), "--vision-tower", str(tower_dir), "--data", str(data),
            "--max-tokens", "2"]
    assert main([*argv, "--bank", str(tmp_path / "pb")]) == 0, capsys.readouterr().err
    assert "exact" in capsys.readouterr().out
    assert main(argv) == 2 and "parrot bank" in capsys.readouterr().err  # no projector without the bank
    assert main([*argv, "--bank", str(tmp_path / "pb"), "--runner", "local"]) == 2
    assert "serving engine" in capsys.readouterr().err
