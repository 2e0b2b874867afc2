"""Checks a bank must pass before anything else sees it, and the size limits applied before loading."""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from .bank import ExpertBank, LinearExperts, linear_name, tensor_name
from .errors import BankError
from .fingerprint import FFN_TARGETS, TARGETS
from .kinds import KINDS, RESERVED_KINDS

# Limits checked against declared sizes before any tensor is read.
MAX_EXPERTS = 256  # per router
MAX_RANK = 1024
MAX_BANK_BYTES = 16 << 30  # fp32 bytes of all tensors
MAX_SCALING = 1024.0  # alpha / r (or / sqrt(r)): beyond it a delta swamps the base model's activations
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise BankError(
            f"bank name {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_kind(kind: object) -> str:
    if not isinstance(kind, str):
        raise BankError(f"kind must be a string, got {type(kind).__name__}")
    if kind in RESERVED_KINDS:
        raise BankError(f"kind {kind!r} ({RESERVED_KINDS[kind]}) is reserved and not supported by this version")
    if kind not in KINDS:
        raise BankError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    return kind  # type: ignore[return-value]


def check_rank(rank: object) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise BankError(f"rank must be an integer in [1, {MAX_RANK}], got {rank!r}")
    return rank


def check_num_experts(n: object, where: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_EXPERTS:
        raise BankError(f"{where}: number of experts must be an integer in [1, {MAX_EXPERTS}], got {n!r}")
    return n


def check_alpha(alpha: object) -> float:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise BankError(f"alpha must be a finite positive number, got {alpha!r}")
    return float(alpha)


def check_scaling(scaling: float) -> float:
    if not math.isfinite(scaling) or not 0 < scaling <= MAX_SCALING:
        raise BankError(f"scaling (alpha / rank, or / sqrt(rank) with use_rslora) is {scaling!r}; it must be in "
                        f"(0, {MAX_SCALING:g}]")
    return scaling


def check_act_fn(name: object) -> str | None:
    """None (the base model's activation) or a name this server can run (transformers' ACT2FN)."""
    if name is None:
        return None
    from transformers.activations import ACT2FN  # noqa: PLC0415 - heavy import, only for mixlora banks

    if not isinstance(name, str) or (name not in ("silu", "swish") and name not in ACT2FN):
        raise BankError(f"act_fn {name!r} is not a known activation (known: silu, {', '.join(sorted(ACT2FN))})")
    return name


def check_targets(targets: object, *, allow_empty: bool = False) -> tuple[str, ...]:
    """``allow_empty``: a kind that adapts no linear (parrot)."""
    if not isinstance(targets, (list, tuple)) or not (targets or allow_empty):
        raise BankError("targets must be a non-empty list")
    for t in targets:
        if t not in TARGETS:
            raise BankError(f"unknown target {t!r} (known: {', '.join(TARGETS)})")
    if len(set(targets)) != len(targets):
        raise BankError(f"targets has duplicates: {list(targets)}")
    return tuple(t for t in TARGETS if t in targets)


def validate_bank(bank: ExpertBank, *, file: str | None = None, values: bool = True) -> ExpertBank:
    """Raise BankError (naming ``file`` and the first problem) unless ``bank`` is fully consistent.

    With ``values=False`` only the structure is checked (names, kinds, shapes, counts), so a
    skeleton of ``meta`` tensors can be validated before any weight is read.
    """
    try:
        _validate(bank, values)
    except BankError as exc:
        raise exc.within(bank=bank.name if isinstance(bank.name, str) else None, file=file) from None
    return bank


def _validate(bank: ExpertBank, values: bool) -> None:
    check_name(bank.name)
    if not isinstance(bank.version, str) or len(bank.version) > 128:
        raise BankError(f"version must be a string of at most 128 characters, got {bank.version!r}")
    spec = KINDS[check_kind(bank.kind)]
    check_rank(bank.rank)
    check_alpha(bank.alpha)
    if not isinstance(bank.use_rslora, bool):
        raise BankError(f"use_rslora must be true or false, got {bank.use_rslora!r}")
    check_scaling(bank.scaling)
    if bank.routing.strategy not in spec.strategies:
        raise BankError(
            f"kind {bank.kind!r} routes with {' or '.join(spec.strategies)}, not {bank.routing.strategy!r}"
        )
    if tuple(bank.targets) != check_targets(bank.targets, allow_empty=not spec.lora_experts):
        raise BankError(f"targets must be listed in the order {TARGETS}, got {tuple(bank.targets)}")
    if bank.act_fn is not None and (bank.kind != "mixlora" or not isinstance(bank.act_fn, str)):
        raise BankError(f"act_fn is only meaningful for kind 'mixlora' (got {bank.act_fn!r} for {bank.kind!r})")
    if bank.parrot is not None and bank.kind != "parrot":
        raise BankError(f"a parrot config is only meaningful for kind 'parrot' (got one for {bank.kind!r})")
    check_act_fn(bank.act_fn)
    if len(bank.layers) != bank.base.num_hidden_layers:
        raise BankError(f"has {len(bank.layers)} layers, the base model has {bank.base.num_hidden_layers}")
    if (bank.extra or any(layer.extra for layer in bank.layers)) and not spec.extra_tensors:
        names = list(bank.extra) + [f"layers.{i}.extra.{k}" for i, layer in enumerate(bank.layers) for k in layer.extra]
        raise BankError(f"kind {bank.kind!r} has no extra tensors, found {', '.join(names)}")
    for key, t in list(bank.extra.items()) + [(k, t) for layer in bank.layers for k, t in layer.extra.items()]:
        if not isinstance(t, Tensor):
            raise BankError(f"extra tensor {key} is not a tensor")
        if values:
            _check_values(t, f"extra tensor {key}")

    used: set[str] = set()
    for i, layer in enumerate(bank.layers):
        unknown = sorted(set(layer.linears) - set(bank.targets))
        if unknown:
            raise BankError(f"layer {i} adapts {', '.join(unknown)}, which is not in targets {list(bank.targets)}")
        used.update(layer.linears)
        block_n = None
        if layer.block_router is not None:
            if not spec.block_router:
                raise BankError(f"layer {i} has a block router, which kind {bank.kind!r} does not use")
            name = tensor_name(i, None, "block_router")
            if not isinstance(layer.block_router, Tensor) or layer.block_router.dim() != 2:
                raise BankError(f"{name} must be a 2-d tensor [N, hidden]")
            block_n = check_num_experts(layer.block_router.shape[0], name)
            _check_tensor(layer.block_router, (block_n, bank.base.hidden_size), name, values)
            _check_route_count(bank, block_n, name)
        for target, experts in layer.linears.items():
            where = linear_name(i, target)
            n = _check_linear(bank, experts, target, where, values)
            if spec.linear_router:
                if experts.router is None:
                    raise BankError(f"{where} has no router (kind {bank.kind!r} routes every linear)")
                _check_tensor(experts.router, (n, bank.base.linear_shape(target)[0]), f"{where}.router", values)
                _check_route_count(bank, n, where)
            elif experts.router is not None:
                raise BankError(f"{where} has a router, which kind {bank.kind!r} does not use")
            if spec.block_router and target in FFN_TARGETS:
                if block_n is None:
                    raise BankError(f"{where} has FFN experts but layer {i} has no block router")
                if n != block_n:
                    raise BankError(f"{where} has {n} experts, the layer's block router has {block_n}")
            elif not spec.linear_router and n != 1:
                raise BankError(f"{where} has {n} experts; kind {bank.kind!r} allows one LoRA here")
    if not spec.lora_experts:
        if used:
            raise BankError(f"kind {bank.kind!r} holds no LoRA experts, found some on {sorted(used)}")
        if bank.kind == "parrot":
            from .parrot.bank import validate_parrot_bank  # the parrot kind's own rules

            validate_parrot_bank(bank, values)
            return
        from .factor.bank import validate_factor_bank  # the factor kind's own rules

        validate_factor_bank(bank, values)
        return
    unused = [t for t in bank.targets if t not in used]
    if unused:
        raise BankError(f"targets {unused} are listed but no layer adapts them")
    if bank.kind != "lora" and bank.num_experts() == 0:
        raise BankError("has no experts in any layer")


def _check_linear(bank: ExpertBank, experts: LinearExperts, target: str, where: str, values: bool) -> int:
    if not isinstance(experts.lora_a, Tensor) or experts.lora_a.dim() != 3:
        raise BankError(f"{where}.lora_a must be a 3-d tensor [N, r, in]")
    n = check_num_experts(experts.lora_a.shape[0], where)
    in_f, out_f = bank.base.linear_shape(target)
    if experts.lora_a.shape[1] != bank.rank:
        raise BankError(f"{where}.lora_a has rank {experts.lora_a.shape[1]}, the bank's rank is {bank.rank}")
    _check_tensor(experts.lora_a, (n, bank.rank, in_f), f"{where}.lora_a", values)
    _check_tensor(experts.lora_b, (n, out_f, bank.rank), f"{where}.lora_b", values)
    if not math.isclose(experts.scaling, bank.scaling, rel_tol=1e-6):
        raise BankError(f"{where} has scaling {experts.scaling}, the bank's alpha and rank give {bank.scaling}")
    return n


def _check_route_count(bank: ExpertBank, n: int, where: str) -> None:
    if bank.routing.strategy == "topk" and bank.routing.top_k > n:
        raise BankError(f"routing.top_k {bank.routing.top_k} exceeds the {n} experts of {where}")


def _check_tensor(t: object, shape: tuple[int, ...], name: str, values: bool) -> None:
    if not isinstance(t, Tensor):
        raise BankError(f"{name} is not a tensor")
    if tuple(t.shape) != shape:
        raise BankError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    if values:
        _check_values(t, f"tensor {name}")


def _check_values(t: Tensor, name: str) -> None:
    if t.dtype != torch.float32:
        raise BankError(f"{name} is {t.dtype}, expected torch.float32")
    if t.device.type != "cpu":
        raise BankError(f"{name} is on {t.device}, expected the CPU")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise BankError(f"{name} has {bad} NaN or infinite values")
