"""Engine test helpers: a shared tiny model/tokenizer and an engine factory.

If the detokenizer module has not landed yet, a minimal stand-in is installed for these tests only.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest


def _install_detokenizer_standin() -> None:
    try:
        importlib.import_module("server.engine.detokenizer")
        return
    except ImportError:
        pass
    mod = types.ModuleType("server.engine.detokenizer")

    class IncrementalDetokenizer:
        def __init__(self, tokenizer, prompt_ids, skip_special_tokens=True):
            self.tok, self.ids, self.sent, self.skip = tokenizer, [], "", skip_special_tokens

        def add(self, token_id):
            self.ids.append(token_id)
            text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
            if text.endswith("\ufffd"):
                return ""
            new, self.sent = text[len(self.sent):], text
            return new

    class StopStringMatcher:
        def __init__(self, stop, include_stop_str_in_output=False):
            self.stop, self.include, self.held = list(stop), include_stop_str_in_output, ""

        def feed(self, text):
            buf = self.held + text
            hits = [(buf.find(s), s) for s in self.stop if s in buf]
            if hits:
                i, s = min(hits)
                self.held = ""
                return buf[: i + (len(s) if self.include else 0)], True
            keep = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, len(buf)), 0, -1):
                    if buf.endswith(s[:k]):
                        keep = max(keep, k)
                        break
            self.held = buf[len(buf) - keep:] if keep else ""
            return buf[: len(buf) - keep], False

        def flush(self):
            out, self.held = self.held, ""
            return out

    mod.IncrementalDetokenizer = IncrementalDetokenizer
    mod.StopStringMatcher = StopStringMatcher
    sys.modules["server.engine.detokenizer"] = mod


_install_detokenizer_standin()


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from server.model import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from server.engine.llm_engine import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def make_engine(tiny_model_dir, tiny_model, tiny_tokenizer):
    """make_engine(**config overrides) -> LLMEngine on the tiny model (loaded once per session)."""
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine

    def make(model=None, tokenizer=None, model_dir=None, **overrides):
        overrides.setdefault("kv_cache_memory", 8 << 20)
        cfg = EngineConfig(model=model_dir or tiny_model_dir, device="cpu", **overrides)
        return LLMEngine(cfg, model=model or tiny_model, tokenizer=tokenizer or tiny_tokenizer)

    return make
