"""Fixtures: a tiny CLIP tower, a tiny released-layout Parrot checkpoint, a tiny Llama with a tower."""

from __future__ import annotations

import pytest

from .builders import make_parrot, make_tower


@pytest.fixture(scope="session")
def tower_dir(tmp_path_factory):
    return make_tower(tmp_path_factory.mktemp("tower") / "tiny-clip")


@pytest.fixture(scope="session")
def parrot_dir(tmp_path_factory, tower_dir, default_model_dir):
    return make_parrot(tmp_path_factory.mktemp("parrot") / "tiny-parrot", tower_dir, default_model_dir)


@pytest.fixture(scope="session")
def parrot_model(parrot_dir):
    from server.model.parrot import load_model_with_vision

    return load_model_with_vision(parrot_dir)


@pytest.fixture(scope="session")
def parrot_tokenizer(parrot_dir):
    from server.engine.llm_engine import load_tokenizer

    return load_tokenizer(parrot_dir)


@pytest.fixture(scope="session")
def tower_only_model(tiny_model_dir, tower_dir):
    """The tiny Llama with a CLIP tower and no projector (image requests need a parrot bank)."""
    from server.model.parrot import load_model_with_vision

    return load_model_with_vision(tiny_model_dir, vision_tower=tower_dir)
