"""This project's bank folder: ``bank.json`` + ``weights.safetensors`` (docs/bank-format.md)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .bank import ExpertBank, LayerAdapters, LinearExperts, tensor_name
from .errors import BankBudgetExceeded, BankError
from .fingerprint import BaseFingerprint
from .kinds import KINDS
from .routing import RoutingConfig
from .tensor_files import read_json_file, read_safetensors
from .validation import (
    MAX_BANK_BYTES,
    check_alpha,
    check_kind,
    check_name,
    check_num_experts,
    check_rank,
    check_targets,
    validate_bank,
)

FORMAT = "moleserve-bank"
FORMAT_VERSION = 1
META_FILE = "bank.json"
WEIGHTS_FILE = "weights.safetensors"
MAX_META_BYTES = 4 << 20
MAX_DIM = 1 << 31  # one tensor dimension; larger declared sizes are refused before any arithmetic on them
_TOP_KEYS = {
    "format", "format_version", "name", "version", "kind", "base", "rank", "alpha", "use_rslora",
    "routing", "targets", "act_fn", "layers", "extra", "parrot",
}


def save_bank(bank: ExpertBank, folder: str | Path) -> None:
    """Validate ``bank``, then write it; ``bank.json`` is written last, so a folder that has one is
    complete. Files are replaced atomically, so a reader never sees half a file."""
    validate_bank(bank)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    tensors = {k: t.detach().to("cpu", torch.float32).contiguous().clone() for k, t in bank.named_tensors().items()}
    _replace(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    meta = json.dumps(bank_metadata(bank), indent=1)
    _replace(folder / META_FILE, lambda tmp: tmp.write_text(meta + "\n"))


def bank_metadata(bank: ExpertBank) -> dict[str, Any]:
    layers = []
    for layer in bank.layers:
        entry: dict[str, Any] = {}
        if layer.linears:
            entry["experts"] = {t: layer.linears[t].num_experts() for t in bank.targets if t in layer.linears}
        if layer.block_router is not None:
            entry["block_router"] = layer.block_router.shape[0]
        if layer.extra:
            entry["extra"] = {k: list(t.shape) for k, t in layer.extra.items()}
        layers.append(entry)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": bank.name,
        "version": bank.version,
        "kind": bank.kind,
        "base": bank.base.to_dict(),
        "rank": bank.rank,
        "alpha": bank.alpha,
        "use_rslora": bank.use_rslora,
        "routing": bank.routing.to_dict(),
        "targets": list(bank.targets),
        "act_fn": bank.act_fn,
        "layers": layers,
        "extra": {k: list(t.shape) for k, t in bank.extra.items()},
    }
    if bank.parrot is not None:
        meta["parrot"] = bank.parrot.to_dict()
    return meta


def load_saved_bank(folder: str | Path, *, base: BaseFingerprint | None = None, name: str | None = None,
                    max_bytes: int | None = None) -> ExpertBank:
    """Read and validate a bank folder. The structure declared in ``bank.json`` is validated (and
    checked against ``base`` and against ``max_bytes``, the fp32 bytes its tensors may take) before
    a byte of ``weights.safetensors`` is read; the file's header must then match it exactly."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BankError(f"bank folder {str(folder)!r} does not exist or is not a folder")
    label = name if name is not None else folder.name  # refusals name the bank as it was asked for
    try:
        meta = _read_meta(folder / META_FILE)
        if name is None and isinstance(meta.get("name"), str):
            label = meta["name"]
        skeleton, expected = _skeleton(meta, max_bytes)
        if name is not None:
            skeleton.name = check_name(name)
        if base is not None and (diff := skeleton.base.mismatches(base)):
            raise BankError(f"was made for a different base model: {'; '.join(diff)} (bank != model)")
        validate_bank(skeleton, values=False)
    except BankError as exc:
        raise exc.within(bank=label, file=META_FILE) from None
    try:
        tensors = read_safetensors(folder / WEIGHTS_FILE, expected)
    except BankError as exc:
        raise exc.within(bank=label) from None
    return validate_bank(_fill(skeleton, tensors), file=WEIGHTS_FILE)


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise BankError("missing", file=META_FILE)
    meta = read_json_file(path, MAX_META_BYTES, META_FILE)
    if not isinstance(meta, dict):
        raise BankError("not a JSON object", file=META_FILE)
    return meta


def _skeleton(meta: dict[str, Any], max_bytes: int | None = None) -> tuple[ExpertBank, dict[str, tuple[int, ...]]]:
    """The bank ``meta`` declares, with ``meta``-device tensors, and the tensors its weights must hold."""
    if meta.get("format") != FORMAT:
        raise BankError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BankError(f"format_version {meta.get('format_version')!r} is not supported (this version reads {FORMAT_VERSION})")
    unknown = sorted(set(meta) - _TOP_KEYS)
    if unknown:
        raise BankError(f"unknown fields: {', '.join(unknown)}")
    base_raw = meta.get("base")
    base_keys = {f.name for f in fields(BaseFingerprint)}
    if not isinstance(base_raw, dict) or set(base_raw) != base_keys:
        raise BankError(f"base must be an object with exactly the fields {', '.join(sorted(base_keys))}")
    base = BaseFingerprint.from_hf_config(base_raw)
    kind = check_kind(meta.get("kind"))
    rank = check_rank(meta.get("rank"))
    targets = check_targets(meta.get("targets"), allow_empty=not KINDS[kind].lora_experts)
    layers_raw = meta.get("layers")
    if not isinstance(layers_raw, list) or len(layers_raw) != base.num_hidden_layers:
        raise BankError(f"layers must be a list with one entry per base layer ({base.num_hidden_layers})")
    spec = KINDS[kind]
    use_rslora = meta.get("use_rslora")
    if not isinstance(use_rslora, bool):
        raise BankError(f"use_rslora must be true or false, got {use_rslora!r}")
    alpha = check_alpha(meta.get("alpha"))
    scaling = alpha / (math.sqrt(rank) if use_rslora else rank)

    expected: dict[str, tuple[int, ...]] = {}
    layers = []
    for i, entry in enumerate(layers_raw):
        if not isinstance(entry, dict) or set(entry) - {"experts", "block_router", "extra"}:
            raise BankError(f"layers[{i}] must be an object with only experts, block_router and extra")
        layer = LayerAdapters()
        experts = entry.get("experts", {})
        if not isinstance(experts, dict):
            raise BankError(f"layers[{i}].experts must be an object (target -> number of experts)")
        for target, n in experts.items():
            if target not in targets:
                raise BankError(f"layers[{i}] adapts {target!r}, which is not in targets {list(targets)}")
            n = check_num_experts(n, f"layers[{i}].experts.{target}")
            in_f, out_f = base.linear_shape(target)
            shapes = {"lora_a": (n, rank, in_f), "lora_b": (n, out_f, rank)}
            if spec.linear_router:
                shapes["router"] = (n, in_f)
            for part, shape in shapes.items():
                expected[tensor_name(i, target, part)] = shape
            meta_t = {part: _meta_tensor(shape) for part, shape in shapes.items()}
            layer.linears[target] = LinearExperts(scaling=scaling, **meta_t)
        if "block_router" in entry:
            n = check_num_experts(entry["block_router"], f"layers[{i}].block_router")
            expected[tensor_name(i, None, "block_router")] = (n, base.hidden_size)
            layer.block_router = _meta_tensor((n, base.hidden_size))
        for key, shape in _extra_shapes(entry.get("extra", {}), f"layers[{i}].extra").items():
            expected[f"layers.{i}.extra.{key}"] = shape
            layer.extra[key] = _meta_tensor(shape)
        layers.append(layer)
    extra = {}
    for key, shape in _extra_shapes(meta.get("extra", {}), "extra").items():
        expected[f"extra.{key}"] = shape
        extra[key] = _meta_tensor(shape)

    total = 4 * sum(math.prod(s) for s in expected.values())
    if total > MAX_BANK_BYTES:
        raise BankError(f"declares {total} bytes of tensors, more than the {MAX_BANK_BYTES} byte limit")
    if max_bytes is not None and total > max_bytes:
        raise BankBudgetExceeded(f"declares {total} bytes of tensors; the bank memory budget has {max_bytes} bytes "
                                 "left (--bank-memory)")
    act_fn = meta.get("act_fn")
    parrot = None
    if kind == "parrot":
        from .parrot.bank import ParrotBankConfig

        parrot = ParrotBankConfig.from_dict(meta.get("parrot"), hidden_size=base.hidden_size)
    elif "parrot" in meta:
        raise BankError(f"field parrot is only meaningful for kind 'parrot', this bank is {kind!r}")
    bank = ExpertBank(
        name=check_name(meta.get("name")),
        version=meta.get("version"),
        kind=kind,
        base=base,
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        routing=RoutingConfig.from_dict(meta.get("routing")),
        targets=targets,
        layers=layers,
        extra=extra,
        act_fn=act_fn,
        parrot=parrot,
    )
    return bank, expected


def _extra_shapes(raw: Any, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(raw, dict):
        raise BankError(f"{where} must be an object (name -> shape)")
    shapes = {}
    for key, shape in raw.items():
        if not isinstance(key, str) or not key.replace("_", "").replace(".", "").isalnum():
            raise BankError(f"{where}: invalid tensor name {key!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)):
            raise BankError(f"{where}.{key}: invalid shape (a list of at most 8 sizes in [0, {MAX_DIM}])")
        if 4 * math.prod(shape) > MAX_BANK_BYTES:
            raise BankError(f"{where}.{key}: shape {shape} is more than the {MAX_BANK_BYTES} byte limit")
        shapes[key] = tuple(shape)
    return shapes


def _meta_tensor(shape: tuple[int, ...]) -> Tensor:
    return torch.empty(shape, dtype=torch.float32, device="meta")


def _fill(bank: ExpertBank, tensors: dict[str, Tensor]) -> ExpertBank:
    """Replace the skeleton's ``meta`` tensors with the loaded ones (same names, checked shapes)."""
    for i, layer in enumerate(bank.layers):
        for target, experts in layer.linears.items():
            experts.lora_a = tensors[tensor_name(i, target, "lora_a")]
            experts.lora_b = tensors[tensor_name(i, target, "lora_b")]
            if experts.router is not None:
                experts.router = tensors[tensor_name(i, target, "router")]
        if layer.block_router is not None:
            layer.block_router = tensors[tensor_name(i, None, "block_router")]
        layer.extra = {k: tensors[f"layers.{i}.extra.{k}"] for k in layer.extra}
    bank.extra = {k: tensors[f"extra.{k}"] for k in bank.extra}
    return bank


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
