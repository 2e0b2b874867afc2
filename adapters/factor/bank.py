"""The ``factor`` bank kind: what a FactorLLM bank stores, how it is built, and its validation rules.

A factor bank holds no LoRA experts. Each factorised layer i has:

- ``layers.{i}.mlp.block_router``      [E, hidden] fp32, the router on the FFN input (E experts);
- ``layers.{i}.extra.permutation``     [I], the intermediate neurons in expert order: expert e owns
  the original neurons ``permutation[e*I/E : (e+1)*I/E]`` (integers stored as fp32, exact < 2^24);
- ``layers.{i}.extra.scale``           [1], the factor s multiplying the sum of the chosen experts;
- optionally ``layers.{i}.extra.gate_up`` [2I, hidden] and ``layers.{i}.extra.down`` [hidden, I]:
  fine-tuned FFN weights in the *original* neuron order (absent: the base model's weights are used,
  and the bank stays small).

A layer with no entries keeps its dense FFN. ``routing`` is ``topk`` with ``top_k`` = K; ``targets``
names the FFN linears the bank replaces; ``rank``/``alpha`` are unused and written as 1.

Serving (adapters/factor/serving.py): ``FFN(x) = s * sum_{e in topk(router @ x)} expert_e(x)``.
The gates are binary: factorised experts are disjoint *parts* of one sum, not alternative
estimates of it (as MixLoRA's experts are), so weighting them by softmax probabilities would make
K = E differ from the dense FFN. With K = E every part is chosen and s = 1 (enforced), which
reproduces the dense FFN exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..bank import ExpertBank, LayerAdapters
from ..errors import BankError
from ..fingerprint import FFN_TARGETS, BaseFingerprint
from ..routing import RoutingConfig

PERMUTATION = "permutation"
SCALE = "scale"
GATE_UP = "gate_up"
DOWN = "down"


def build_factor_bank(
    name: str,
    base: BaseFingerprint,
    *,
    top_k: int,
    routers: list[Tensor | None],
    permutations: list[Tensor | None],
    scales: list[float],
    gate_up: list[Tensor] | None = None,
    down: list[Tensor] | None = None,
    version: str = "1",
) -> ExpertBank:
    """A validated factor bank. Per layer: router [E, hidden], permutation [I] (int), scale; None
    leaves that layer dense. gate_up [2I, hidden] / down [hidden, I]: fine-tuned weights (original order)."""
    layers = []
    for i, (router, perm) in enumerate(zip(routers, permutations, strict=True)):
        layer = LayerAdapters()
        if router is not None:
            layer.block_router = router.detach().float().cpu().contiguous()
            layer.extra[PERMUTATION] = perm.detach().cpu().to(torch.float32)
            layer.extra[SCALE] = torch.tensor([float(scales[i])], dtype=torch.float32)
            if gate_up is not None:
                layer.extra[GATE_UP] = gate_up[i].detach().float().cpu().contiguous()
                layer.extra[DOWN] = down[i].detach().float().cpu().contiguous()
        layers.append(layer)
    bank = ExpertBank(
        name=name, version=version, kind="factor", base=base, rank=1, alpha=1.0, use_rslora=False,
        routing=RoutingConfig(strategy="topk", top_k=top_k), targets=FFN_TARGETS, layers=layers,
    )
    from ..validation import validate_bank

    return validate_bank(bank)


def layer_permutation(layer: LayerAdapters) -> Tensor:
    """The stored permutation as int64 [I] (validated on load)."""
    return layer.extra[PERMUTATION].round().long()


def validate_factor_bank(bank: ExpertBank, values: bool) -> None:
    """The factor kind's rules (called by ``validate_bank`` after the generic checks)."""
    if tuple(bank.targets) != FFN_TARGETS:
        raise BankError(f"kind 'factor' replaces the FFN: targets must be {list(FFN_TARGETS)}, got {list(bank.targets)}")
    if bank.extra:
        raise BankError(f"kind 'factor' has no bank-level extra tensors, found {', '.join(bank.extra)}")
    hidden, inter = bank.base.hidden_size, bank.base.intermediate_size
    shapes = {PERMUTATION: (inter,), SCALE: (1,), GATE_UP: (2 * inter, hidden), DOWN: (hidden, inter)}
    factorised = 0
    for i, layer in enumerate(bank.layers):
        where = f"layers.{i}.extra"
        if layer.block_router is None:
            if layer.extra:
                raise BankError(f"layer {i} has extra tensors but no block router")
            continue
        factorised += 1
        e = layer.block_router.shape[0]
        if inter % e:
            raise BankError(f"layer {i}: {e} experts do not divide intermediate_size {inter}")
        unknown = sorted(set(layer.extra) - set(shapes))
        if unknown:
            raise BankError(f"{where} has unknown tensors {unknown} (known: {', '.join(shapes)})")
        for key in (PERMUTATION, SCALE):
            if key not in layer.extra:
                raise BankError(f"layer {i} has a router but no {where}.{key}")
        if (GATE_UP in layer.extra) != (DOWN in layer.extra):
            raise BankError(f"layer {i}: fine-tuned weights need both {where}.{GATE_UP} and {where}.{DOWN}")
        for key, t in layer.extra.items():
            if tuple(t.shape) != shapes[key]:
                raise BankError(f"tensor {where}.{key} has shape {tuple(t.shape)}, expected {shapes[key]}")
        if values:
            perm = layer.extra[PERMUTATION]
            if not torch.equal(perm, perm.round()) or not torch.equal(
                torch.sort(perm.long()).values, torch.arange(inter)
            ):
                raise BankError(f"tensor {where}.{PERMUTATION} is not a permutation of 0..{inter - 1}")
            scale = float(layer.extra[SCALE])
            if not scale > 0:
                raise BankError(f"tensor {where}.{SCALE} must be positive, got {scale}")
            if bank.routing.top_k >= e and scale != 1.0:
                raise BankError(f"layer {i}: top_k {bank.routing.top_k} >= {e} experts needs scale 1 (the dense FFN), got {scale}")
    if factorised == 0:
        raise BankError("kind 'factor' factorises no layer")
