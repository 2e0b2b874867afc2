"""An ecosystem checkpoint folder (``adapter_config.json`` + ``adapter_model.{safetensors,bin}``),
read the way the converters need it: config first, weights only once the config passed its limits,
then each tensor taken by name and shape so that nothing missing or left over goes unnoticed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import BankError
from ..fingerprint import TARGETS
from ..tensor_files import read_json_file, read_safetensors, read_torch_pickle
from ..validation import check_alpha, check_rank

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_CONFIG_BYTES = 1 << 20
STRING_FIELDS = ("peft_type", "routing_strategy", "task_type", "act_fn", "bias", "base_model_name_or_path")


class Checkpoint:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.config = self._read_config()
        found = [f for f in WEIGHT_FILES if (self.folder / f).exists()]  # read_* refuse non-regular files
        if not found:
            raise BankError(f"missing: the folder has neither {' nor '.join(WEIGHT_FILES)}", file=WEIGHT_FILES[0])
        self.weights_file = found[0]  # safetensors preferred
        self._weights: dict[str, Tensor] | None = None

    def _read_config(self) -> dict[str, Any]:
        path = self.folder / CONFIG_FILE
        if not path.exists():
            raise BankError("missing", file=CONFIG_FILE)
        config = read_json_file(path, MAX_CONFIG_BYTES, CONFIG_FILE)
        if not isinstance(config, dict):
            raise BankError("not a JSON object", file=CONFIG_FILE)
        for key in STRING_FIELDS:  # the converters compare and look these up as names
            if config.get(key) is not None and not isinstance(config[key], str):
                raise BankError(f"{key} must be a string, got {type(config[key]).__name__}", file=CONFIG_FILE)
        return config

    def config_error(self, reason: str) -> BankError:
        return BankError(reason, file=CONFIG_FILE)

    def lora_hparams(self) -> tuple[int, float, bool]:
        """(r, lora_alpha, use_rslora), refusing DoRA, which this server does not run."""
        cfg = self.config
        try:
            rank = check_rank(cfg.get("r"))
            alpha = check_alpha(cfg.get("lora_alpha"))
        except BankError as exc:
            raise exc.within(file=CONFIG_FILE) from None
        use_rslora = cfg.get("use_rslora", False)
        if not isinstance(use_rslora, bool):
            raise self.config_error(f"use_rslora must be true or false, got {use_rslora!r}")
        if cfg.get("use_dora", False):
            raise self.config_error("use_dora is set: DoRA adapters are not supported")
        return rank, alpha, use_rslora

    def targets(self, *, required: bool = True) -> tuple[str, ...] | None:
        """Targets named by ``target_modules`` (a list, or MoE-PEFT's name -> bool object).
        A regex string gives None: the weights then say which linears are adapted."""
        raw = self.config.get("target_modules")
        if isinstance(raw, str) and not required:
            return None
        if isinstance(raw, dict):
            names = [k for k, on in raw.items() if on]
        elif isinstance(raw, list) and all(isinstance(k, str) for k in raw):
            names = list(raw)
        else:
            raise self.config_error(f"target_modules must be a list of names, got {raw!r}")
        short = [k.rsplit(".", 1)[-1] for k in names]
        for name, s in zip(names, short):
            if s not in TARGETS:
                raise self.config_error(f"target_modules names {name!r}, which this server cannot adapt (known: {', '.join(TARGETS)})")
        if not short:
            raise self.config_error("target_modules is empty")
        return tuple(t for t in TARGETS if t in short)

    def load_weights(self) -> None:
        path = self.folder / self.weights_file
        self._weights = read_safetensors(path) if self.weights_file.endswith(".safetensors") else read_torch_pickle(path)

    def keys(self) -> list[str]:
        assert self._weights is not None, "load_weights() first"
        return list(self._weights)

    def take(self, key: str, shape: tuple[int, ...]) -> Tensor:
        """The tensor ``key``, which must exist and have ``shape``; it is removed from the pool."""
        assert self._weights is not None, "load_weights() first"
        if key not in self._weights:
            raise BankError(f"missing tensor {key}", file=self.weights_file)
        t = self._weights.pop(key)
        if tuple(t.shape) != tuple(shape):
            raise BankError(f"tensor {key} has shape {tuple(t.shape)}, expected {tuple(shape)}", file=self.weights_file)
        return t

    def finish(self) -> None:
        """Refuse tensors nobody took: the checkpoint holds something this conversion would drop."""
        assert self._weights is not None
        if self._weights:
            left = sorted(self._weights)
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise BankError(f"unexpected tensor {left[0]}{more}", file=self.weights_file)


def scaling_of(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if use_rslora else rank)
