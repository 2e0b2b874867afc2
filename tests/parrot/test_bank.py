"""The ``parrot`` bank kind: format round trip, validation, the registry (tower checks, versions,
``visual_adapter`` on the handle) and the admin routes over HTTP."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import BankError, BaseFingerprint, load_bank
from adapters.parrot import ParrotConfig, VisualAdapter, VisualRouting
from adapters.parrot.bank import TowerSpec, build_parrot_bank, visual_adapter
from adapters.runtime import BankRegistry
from adapters.runtime.registry import BankCombinationRefused, BankLoadError
from server.engine.protocol import UnknownBank
from server.model import ModelConfig
from tests.adapters.bank_builders import fingerprint_of, random_bank

MM, TOKENS = 24, 5  # the tiny tower: width and visual tokens per image (CLS + 4 patches)
TOWER = TowerSpec(hidden_size=MM, tokens_per_image=TOKENS)


def parrot_config(hidden: int, *, experts: int = 3, mm: int = MM) -> ParrotConfig:
    raw = {"mm_hidden_size": mm, "mm_vision_select_feature": "cls_patch", "moe_weight": 0.1}
    if experts:
        raw.update(moe_hidden_size=hidden, num_experts=experts, moe_intermediate_size=32)
    return ParrotConfig.from_dict(raw, hidden_size=hidden)


def parrot_bank(base: BaseFingerprint, *, seed: int = 0, name: str = "vis", experts: int = 3, mm: int = MM,
                tokens: int = TOKENS):
    torch.manual_seed(seed)
    adapter = VisualAdapter(parrot_config(base.hidden_size, experts=experts, mm=mm))
    return build_parrot_bank(name, base, adapter, tokens_per_image=tokens), adapter


def _outputs(adapter: VisualAdapter, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, TOKENS, adapter.config.mm_hidden_size, generator=gen)
    text = torch.randn(7, adapter.config.hidden_size, generator=gen)
    with torch.no_grad():
        out, _ = adapter.mix(list(adapter.project(feats)), [text], VisualRouting())
    return out[0]


@pytest.fixture(scope="module")
def base(tiny_model_dir) -> BaseFingerprint:
    return fingerprint_of(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_config(tiny_model_dir) -> ModelConfig:
    return ModelConfig.from_folder(tiny_model_dir)


@pytest.mark.parametrize("experts", [3, 0])
def test_round_trip_keeps_the_adapter(base, tmp_path, experts):
    bank, adapter = parrot_bank(base, experts=experts)
    bank.save(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "bank.json").read_text())
    assert meta["kind"] == "parrot" and meta["targets"] == [] and meta["parrot"]["tokens_per_image"] == TOKENS
    names = set(load_file(tmp_path / "b" / "weights.safetensors"))
    assert {"extra.mm_projector.0.weight", "extra.mm_projector.2.bias"} <= names
    assert ("extra.moe_model.experts.2.down_proj.weight" in names) == bool(experts)
    loaded = load_bank(tmp_path / "b", base=base)
    assert loaded.parrot == bank.parrot
    assert torch.equal(_outputs(visual_adapter(loaded)), _outputs(adapter))


def _edit_meta(folder, edit):
    meta = json.loads((folder / "bank.json").read_text())
    edit(meta)
    (folder / "bank.json").write_text(json.dumps(meta))


def _edit_weights(folder, edit):
    tensors = load_file(folder / "weights.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "weights.safetensors"))


@pytest.mark.parametrize("edit_meta, edit_weights, words", [
    (lambda m: m["parrot"].pop("tokens_per_image"), None, ["parrot.tokens_per_image"]),
    (lambda m: m.pop("parrot"), None, ["parrot must be an object"]),
    (lambda m: m["parrot"].update(moe_hidden_size=65), None, ["moe_hidden_size", "hidden_size (64)"]),
    (lambda m: m["parrot"].update(colour="red"), None, ["unknown fields: colour"]),
    (lambda m: m["parrot"].update(mm_projector_type="mlp99x_gelu"), None, ["mm_projector_type"]),
    (lambda m: m.update(targets=["q_proj"]), None, ["targets must be empty"]),
    (lambda m: m["extra"].pop("moe_model.gate.weight"), lambda t: t.pop("extra.moe_model.gate.weight"),
     ["missing tensors extra.moe_model.gate.weight"]),
    (lambda m: m["extra"].update({"moe_model.gate.weight": [3, 63]}), None, ["moe_model.gate.weight", "(3, 63)"]),
    (lambda m: m["extra"].update({"mm_projector.4.weight": [64, 64]}),
     lambda t: t.update({"extra.mm_projector.4.weight": torch.zeros(64, 64)}), ["unknown tensors"]),
    (None, lambda t: t["extra.mm_projector.0.weight"].__setitem__((0, 0), float("nan")), ["NaN"]),
    (None, lambda t: t.update({"extra.mm_projector.0.bias": torch.zeros(63)}), ["mm_projector.0.bias"]),
    (lambda m: (m["base"].update(hidden_size=128), m["parrot"].update(moe_hidden_size=128)), None,
     ["different base model", "hidden_size 128 != 64"]),
])
def test_refusals_name_the_problem(base, tmp_path, edit_meta, edit_weights, words):
    bank, _ = parrot_bank(base)
    folder = tmp_path / "b"
    bank.save(folder)
    if edit_meta:
        _edit_meta(folder, edit_meta)
    if edit_weights:
        _edit_weights(folder, edit_weights)
    with pytest.raises(BankError) as err:
        load_bank(folder, base=base)
    for w in words:
        assert w in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_parrot_field_only_on_parrot_banks(base, tmp_path):
    random_bank("dynmole", base, name="d").save(tmp_path / "d")
    _edit_meta(tmp_path / "d", lambda m: m.update(parrot={"mm_hidden_size": 8, "tokens_per_image": 2}))
    with pytest.raises(BankError, match="only meaningful for kind 'parrot'"):
        load_bank(tmp_path / "d", base=base)


def test_registry_checks_the_tower(base, tiny_config, tmp_path):
    bank, _ = parrot_bank(base)
    bank.save(tmp_path / "vis")
    no_tower = BankRegistry(tiny_config, allowed_roots=[tmp_path])
    with pytest.raises(BankLoadError, match="no vision tower.*--vision-tower") as err:
        no_tower.load_sync("vis", tmp_path / "vis")
    assert err.value.status == 400 and no_tower.list() == []
    for tower, words in [(TowerSpec(MM + 1, TOKENS), "width 24"), (TowerSpec(MM, TOKENS + 1), "5 visual tokens"),
                         (TowerSpec(MM, TOKENS, select_layer=-1), "hidden state -2")]:
        with pytest.raises(BankLoadError, match=words):
            BankRegistry(tiny_config, allowed_roots=[tmp_path], tower=tower).load_sync("vis", tmp_path / "vis")
    reg = BankRegistry(tiny_config, allowed_roots=[tmp_path], tower=TowerSpec(MM, TOKENS, -2, "cls_patch"))
    info = reg.load_sync("vis", tmp_path / "vis")
    assert info["kind"] == "parrot" and info["num_experts"] == 3 and info["resident"] and info["bytes"] > 0


def test_handle_exposes_the_version_it_pinned(base, tiny_config, tiny_model_dir):
    reg = BankRegistry(tiny_config, tower=TOWER)
    bank1, adapter1 = parrot_bank(base, seed=1)
    bank2, adapter2 = parrot_bank(base, seed=2)
    reg.add(bank1)
    reg.add(random_bank("dynmole", base, experts_per_layer=(2,), name="lora-ish"))
    h1 = reg.acquire("vis")
    assert isinstance(h1.visual_adapter, VisualAdapter) and h1.bank is None and h1.factor is None
    assert not any(p.requires_grad for p in h1.visual_adapter.parameters())
    assert torch.equal(_outputs(h1.visual_adapter), _outputs(adapter1))
    reg.add(bank2)  # replace: h1 keeps version 1
    h2 = reg.acquire("vis")
    assert (h1.version, h2.version) == (1, 3) and h1.name == h2.name == "vis"
    assert torch.equal(_outputs(h1.visual_adapter), _outputs(adapter1))
    assert torch.equal(_outputs(h2.visual_adapter), _outputs(adapter2))
    # a parrot bank applies nothing to the LLM: steps with only parrot and base sequences have no adapters
    assert reg.build_step([h1, None, h2], [3, 1, 2]) is None
    other = reg.acquire("lora-ish")
    step = reg.build_step([h1, other], [2, 3])
    assert step.token_bank.tolist() == [-1, -1, 0, 0, 0]
    reg.release(other)
    for name in ("vis+lora-ish", "lora-ish+vis"):
        with pytest.raises(BankCombinationRefused):
            reg.acquire(name)
    reg.unload_sync("vis")
    with pytest.raises(UnknownBank):
        reg.acquire("vis")
    assert torch.equal(_outputs(h2.visual_adapter), _outputs(adapter2))  # still running on its version
    reg.release(h1)
    reg.release(h2)
    assert h1.visual_adapter is None and h2.visual_adapter is None  # freed with the last request
    assert [b["name"] for b in reg.list()] == ["lora-ish"]


def test_admin_routes(base, tiny_model_dir, tiny_config, tmp_path):
    """Load, replace, list, refuse (no tower; another tower) and unload a parrot bank over HTTP; a chat
    request with an image names it in ``model``."""
    import base64
    import io

    import httpx
    from PIL import Image

    from server.api.app import create_app
    from server.engine.async_engine import AsyncEngine
    from server.settings import Settings
    from tests.multimodal.builders import TOKENS_PER_IMAGE, TOWER, make_tower
    from tests.runtime.helpers import make_engine
    from tests.server.conftest import ServerThread
    from tests.server.test_errors import assert_error

    tower_dir = make_tower(tmp_path / "tower")
    parrot_bank(base, mm=TOWER["hidden_size"], tokens=TOKENS_PER_IMAGE)[0].save(tmp_path / "vis")
    parrot_bank(base, mm=TOWER["hidden_size"] + 8, tokens=TOKENS_PER_IMAGE, name="wide")[0].save(tmp_path / "wide")
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 40, 40)).save(buf, format="PNG")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}
    chat = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "Colour?"}]}], "max_tokens": 2}
    for tower in (None, tower_dir):
        llm = make_engine(tiny_model_dir, None, vision_tower=str(tower) if tower else None)
        reg = BankRegistry(tiny_config, allowed_roots=[tmp_path], tower=TowerSpec.of(llm.vision.tower) if tower else None)
        llm.set_adapter_provider(reg)
        settings = Settings(admin_key="adm", bank_root=[tmp_path])
        app = create_app(settings, AsyncEngine(llm.config, engine=llm), reg)
        with ServerThread(app) as st, httpx.Client(base_url=f"http://127.0.0.1:{st.port}", timeout=120,
                                                   headers={"Authorization": "Bearer adm"}) as c:
            r = c.post("/v1/banks", json={"name": "vis", "path": str(tmp_path / "vis")})
            if tower is None:
                assert_error(r, 400, "no vision tower", "--vision-tower")
                assert c.get("/v1/banks").json()["data"] == []
                continue
            assert r.status_code == 200, r.text
            assert r.json()["kind"] == "parrot" and r.json()["num_experts"] == 3
            assert_error(c.post("/v1/banks", json={"name": "wide", "path": str(tmp_path / "wide")}), 400,
                         "width 40", "served tower's is 32")
            assert c.post("/v1/banks", json={"name": "vis", "path": str(tmp_path / "vis")}).json()["version"] == 2
            assert "vis" in [m["id"] for m in c.get("/v1/models").json()["data"]]
            # the tower-only base takes images only on a parrot bank; naming it, they run
            assert_error(c.post("/v1/chat/completions", json=chat), 400)
            r = c.post("/v1/chat/completions", json={**chat, "model": "vis"})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] > TOKENS_PER_IMAGE
            # a text request naming the bank runs on the LLM alone (the bank only adds the visual adapter)
            r = c.post("/v1/completions", json={"model": "vis", "prompt": "hello", "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert c.delete("/v1/banks/vis").status_code == 200
            assert_error(c.post("/v1/chat/completions", json={**chat, "model": "vis"}), 404)
