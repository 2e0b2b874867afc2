"""Write checkpoints in each ecosystem's exact layout (ALGORITHMS.md §3), and random banks in ours.

For the converter tests here and for the later logit-equivalence tests against the ``mixlora``
package and PEFT: point any writer at a tiny HF model folder via ``fingerprint_of(model_folder)``.
Every writer returns the tensors it wrote under their checkpoint keys (fp32), so a test can check
where each one lands after conversion. B matrices are random (not PEFT's zero init) so that a
wrong transposition or a swapped expert changes the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters import BaseFingerprint, ExpertBank, LayerAdapters, LinearExperts, RoutingConfig
from adapters.fingerprint import ATTENTION_TARGETS, FFN_TARGETS

TINY = BaseFingerprint(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
)


def fingerprint_of(model_folder: str | Path) -> BaseFingerprint:
    return BaseFingerprint.from_hf_config(json.loads((Path(model_folder) / "config.json").read_text()))


def _module(target: str) -> str:
    return "self_attn" if target in ATTENTION_TARGETS else "mlp"


def _lora_pair(gen: torch.Generator, base: BaseFingerprint, target: str, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    in_f, out_f = base.linear_shape(target)
    return torch.randn(r, in_f, generator=gen) * 0.1, torch.randn(out_f, r, generator=gen) * 0.1


def _write(folder: Path, config: dict, tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    else:
        torch.save(tensors, folder / "adapter_model.bin")
    return tensors


def write_peft_lora(
    folder: Path, base: BaseFingerprint = TINY, *, r: int = 4, alpha: float = 8, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    use_rslora: bool = False, fmt: str = "safetensors", seed: int = 0, layers=None, dtype=torch.float32, **config_extra,
) -> dict[str, torch.Tensor]:
    """PEFT ``save_pretrained`` layout: ``base_model.model.model.layers.{i}.{module}.{proj}.lora_{A|B}.weight``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in layers if layers is not None else range(base.num_hidden_layers):
        for t in targets:
            a, b = _lora_pair(gen, base, t, r)
            prefix = f"base_model.model.model.layers.{i}.{_module(t)}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = a.to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = b.to(dtype)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", "r": r,
        "lora_alpha": alpha, "lora_dropout": 0.05, "target_modules": list(targets), "bias": "none",
        "use_rslora": use_rslora, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "use_dora": False,
    }
    config.update(config_extra)
    return _write(folder, config, tensors, fmt)


def write_mixlora(
    folder: Path, base: BaseFingerprint = TINY, *, r: int = 4, alpha: float = 8, num_experts: int = 4, top_k: int = 2,
    targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), act_fn: str | None = "silu",
    routing_strategy: str = "mixlora", fmt: str = "bin", seed: int = 0, **config_extra,
) -> dict[str, torch.Tensor]:
    """The ``mixlora`` package's (and MoE-PEFT's) MixLoRA layout: a ``moe_gate`` per layer, expert
    LoRAs on FFN projections, one plain LoRA on each attention projection."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(base.num_hidden_layers):
        tensors[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(num_experts, base.hidden_size, generator=gen) * 0.02
        for t in targets:
            prefix = f"mixlora.layers.{i}.{_module(t)}.{t}"
            if t in ATTENTION_TARGETS:
                a, b = _lora_pair(gen, base, t, r)
                tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
                continue
            for e in range(num_experts):
                a, b = _lora_pair(gen, base, t, r)
                tensors[f"{prefix}.experts.{e}.lora_A.weight"], tensors[f"{prefix}.experts.{e}.lora_B.weight"] = a, b
    config = {
        "peft_type": "MIXLORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", "bias": "none",
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.05, "target_modules": list(targets),
        "routing_strategy": routing_strategy, "num_experts": num_experts,
    }
    if routing_strategy == "mixlora":
        config["top_k"] = top_k
    if act_fn is not None:
        config["act_fn"] = act_fn
    config.update(config_extra)
    return _write(folder, config, tensors, fmt)


def write_plugin_moe(
    folder: Path, base: BaseFingerprint = TINY, *, kind: str = "dynmole", r: int = 4, alpha: float = 8,
    num_experts: int = 3, targets=("gate_proj", "up_proj", "down_proj"), fmt: str = "bin", seed: int = 0, **config_extra,
) -> dict[str, torch.Tensor]:
    """MoE-PEFT's DynMoLE / MoLA layout: every targeted linear has ``moe_gate`` [N, in] and N experts."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(base.num_hidden_layers):
        for t in targets:
            prefix = f"{kind}.layers.{i}.{_module(t)}.{t}"
            tensors[f"{prefix}.moe_gate.weight"] = torch.randn(num_experts, base.linear_shape(t)[0], generator=gen)
            for e in range(num_experts):
                a, b = _lora_pair(gen, base, t, r)
                tensors[f"{prefix}.experts.{e}.lora_A.weight"], tensors[f"{prefix}.experts.{e}.lora_B.weight"] = a, b
    config = {
        "peft_type": kind.upper(), "task_type": "CAUSAL_LM", "bias": "none", "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.05, "target_modules": {t: True for t in targets}, "routing_strategy": kind,
        "num_experts": num_experts,
    }
    config.update(config_extra)
    return _write(folder, config, tensors, fmt)


def random_bank(kind: str = "dynmole", base: BaseFingerprint = TINY, *, r: int = 4, alpha: float = 8.0,
                experts_per_layer=(3, 2), seed: int = 0, name: str = "test-bank",
                targets: tuple[str, ...] | None = None) -> ExpertBank:
    """A valid bank of ``kind`` (``experts_per_layer`` gives MoLA-style per-layer counts) on ``targets``
    (None: the kind's usual ones, below)."""
    gen = torch.Generator().manual_seed(seed)
    targets = targets or {
        "lora": ("q_proj", "v_proj", "down_proj"),
        "mixlora": ("q_proj", "gate_proj", "up_proj", "down_proj"),
        "dynmole": ("k_proj", "gate_proj", "up_proj", "down_proj"),
        "mola": ("q_proj", "o_proj", "down_proj"),
    }[kind]
    routing = {
        "lora": RoutingConfig("none"),
        "mixlora": RoutingConfig("topk", top_k=1),
        "dynmole": RoutingConfig("dynmole", top_p=0.6, keep_top_k=1, entropy_threshold=0.8, entropy_index=1.5),
        "mola": RoutingConfig("topk", top_k=2),
    }[kind]
    layers = []
    for i in range(base.num_hidden_layers):
        n = 1 if kind == "lora" else experts_per_layer[i % len(experts_per_layer)]
        layer = LayerAdapters()
        for t in targets:
            in_f, out_f = base.linear_shape(t)
            n_t = 1 if kind == "mixlora" and t not in FFN_TARGETS else n
            router = torch.randn(n_t, in_f, generator=gen) if kind in ("dynmole", "mola") else None
            layer.linears[t] = LinearExperts(
                lora_a=torch.randn(n_t, r, in_f, generator=gen), lora_b=torch.randn(n_t, out_f, r, generator=gen),
                scaling=alpha / r, router=router,
            )
        if kind == "mixlora":
            layer.block_router = torch.randn(n, base.hidden_size, generator=gen)
        layers.append(layer)
    return ExpertBank(
        name=name, version="1", kind=kind, base=base, rank=r, alpha=alpha, use_rslora=False, routing=routing,
        targets=targets, layers=layers, act_fn="silu" if kind == "mixlora" else None,
    )
