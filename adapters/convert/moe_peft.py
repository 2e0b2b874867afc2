"""MoE-PEFT checkpoints (and the PyPI ``mixlora`` package's, which share the MixLoRA layout) ->
``mixlora``, ``dynmole`` and ``mola`` banks. See docs/bank-format.md for what each reference
implementation computes and how it maps onto RoutingConfig.

Key layouts (``{p}`` = mixlora | dynmole | mola, ``{m}.{proj}`` = self_attn.q_proj, mlp.gate_proj, ...):

- mixlora: ``mixlora.layers.{i}.mlp.moe_gate.weight`` [N, hidden] in every layer;
  ``mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_{A|B}.weight`` for targeted FFN projections;
  ``mixlora.layers.{i}.self_attn.{proj}.lora_{A|B}.weight`` (one plain LoRA) for attention ones.
- dynmole, mola: every targeted linear, attention included, has
  ``{p}.layers.{i}.{m}.{proj}.moe_gate.weight`` [N, in] and ``...experts.{e}.lora_{A|B}.weight``.
"""

from __future__ import annotations

import torch

from ..bank import ExpertBank, LayerAdapters, LinearExperts, linear_name
from ..errors import BankError
from ..fingerprint import ATTENTION_TARGETS, BaseFingerprint
from ..routing import RoutingConfig
from ..validation import check_num_experts
from .checkpoint import CONFIG_FILE, Checkpoint, scaling_of

# MoE-PEFT picks the method by peft_type first, then by routing_strategy (lora_config_factory).
PEFT_TYPES = {"MIXLORA": None, "DYNMOLE": "dynmole", "MOLA": "mola", "LORAMOE": "loramoe"}
STRATEGIES = ("mixlora", "mixlora-dynamic", "mixlora-switch", "dynmole", "mola", "loramoe")


def is_moe_peft(config: dict) -> bool:
    return config.get("peft_type") in PEFT_TYPES or config.get("routing_strategy") in STRATEGIES


def convert_moe_peft(ckpt: Checkpoint, base: BaseFingerprint, name: str) -> ExpertBank:
    cfg = ckpt.config
    peft_type = cfg.get("peft_type")
    strategy = PEFT_TYPES.get(peft_type) or cfg.get("routing_strategy")
    if peft_type == "MIXLORA" and strategy not in ("mixlora", "mixlora-dynamic", "mixlora-switch"):
        raise ckpt.config_error(f"peft_type MIXLORA needs routing_strategy mixlora or mixlora-dynamic, got {strategy!r}")
    if strategy == "mixlora-switch":
        raise ckpt.config_error(
            "routing_strategy 'mixlora-switch' is not supported: its top-1 routing drops tokens past a "
            "per-sequence expert capacity, and MoE-PEFT's own inference returns the FFN input unchanged; "
            "retrain with 'mixlora' or 'dynmole'"
        )
    if strategy == "loramoe":
        raise ckpt.config_error("LoRAMoE checkpoints are not supported (kinds: mixlora, dynmole, mola)")
    rank, alpha, use_rslora = ckpt.lora_hparams()
    targets = ckpt.targets()
    try:
        n = check_num_experts(cfg.get("num_experts"), "num_experts")
    except BankError as exc:
        raise exc.within(file=CONFIG_FILE) from None
    if strategy == "dynmole" or strategy == "mola":
        kind, routing, act_fn = strategy, _plugin_routing(ckpt, strategy), None
    else:
        kind, routing, act_fn = "mixlora", _mixlora_routing(ckpt, strategy), _act_fn(ckpt)
        _check_expert_lora(ckpt, rank, alpha, use_rslora)

    ckpt.load_weights()
    scaling = scaling_of(rank, alpha, use_rslora)
    layers = []
    for i in range(base.num_hidden_layers):
        layer = LayerAdapters()
        if kind == "mixlora":
            layer.block_router = ckpt.take(f"mixlora.layers.{i}.mlp.moe_gate.weight", (n, base.hidden_size))
        for target in targets:
            key = f"{kind}.{linear_name(i, target)}"
            in_f, out_f = base.linear_shape(target)
            if kind == "mixlora" and target in ATTENTION_TARGETS:
                a = ckpt.take(f"{key}.lora_A.weight", (rank, in_f))[None]
                b = ckpt.take(f"{key}.lora_B.weight", (out_f, rank))[None]
                layer.linears[target] = LinearExperts(lora_a=a, lora_b=b, scaling=scaling)
                continue
            router = None if kind == "mixlora" else ckpt.take(f"{key}.moe_gate.weight", (n, in_f))
            a = torch.stack([ckpt.take(f"{key}.experts.{e}.lora_A.weight", (rank, in_f)) for e in range(n)])
            b = torch.stack([ckpt.take(f"{key}.experts.{e}.lora_B.weight", (out_f, rank)) for e in range(n)])
            layer.linears[target] = LinearExperts(lora_a=a, lora_b=b, scaling=scaling, router=router)
        layers.append(layer)
    ckpt.finish()
    return ExpertBank(
        name=name,
        version="1",
        kind=kind,
        base=base,
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        routing=routing,
        targets=targets,
        layers=layers,
        act_fn=act_fn,
    )


def _mixlora_routing(ckpt: Checkpoint, strategy: str) -> RoutingConfig:
    cfg = ckpt.config
    try:
        if strategy == "mixlora":
            return RoutingConfig(strategy="topk", top_k=cfg.get("top_k", 2))
        return RoutingConfig(strategy="topp", top_p=cfg.get("top_p", 0.8), temperature=cfg.get("temperature", 0.0))
    except BankError as exc:
        raise exc.within(file=CONFIG_FILE) from None


def _plugin_routing(ckpt: Checkpoint, strategy: str) -> RoutingConfig:
    cfg = ckpt.config
    try:
        if strategy == "mola":
            return RoutingConfig(strategy="topk", top_k=cfg.get("top_k", 2))
        q = cfg.get("entropy_index", 1.1)
        return RoutingConfig(
            strategy="dynmole",
            top_p=cfg.get("top_p", 0.75),
            keep_top_k=cfg.get("keep_top_k", 2),
            entropy_threshold=cfg.get("entropy_threshold", 0.9),
            entropy_index=q,
            entropy_eps=cfg.get("entropy_eps", 1e-5),
            # The released router always calls tsallis_entropy (Shannon at q == 1) whatever
            # entropy_type says, so that is what the bank was trained with.
            entropy_type="shannon" if q == 1 else "tsallis",
        )
    except BankError as exc:
        raise exc.within(file=CONFIG_FILE) from None


def _act_fn(ckpt: Checkpoint) -> str | None:
    act = ckpt.config.get("act_fn")
    if act is not None and (not isinstance(act, str) or not act):
        raise ckpt.config_error(f"act_fn must be an activation name, got {act!r}")
    return act


def _check_expert_lora(ckpt: Checkpoint, rank: int, alpha: float, use_rslora: bool) -> None:
    """MoE-PEFT gives FFN experts the hyper-parameters in ``expert_lora``; the mixlora package
    ignores them. Accept the block only where both read the same thing."""
    expert = ckpt.config.get("expert_lora")
    if expert is None:
        return
    if not isinstance(expert, dict):
        raise ckpt.config_error("expert_lora must be an object")
    differs = [
        k for k, v in (("r", rank), ("lora_alpha", alpha), ("use_rslora", use_rslora)) if k in expert and expert[k] != v
    ]
    if differs or expert.get("use_dora"):
        raise ckpt.config_error(
            f"expert_lora overrides {', '.join(differs) or 'use_dora'}: experts with their own rank or "
            "scaling are not supported (and the mixlora package would ignore them)"
        )

