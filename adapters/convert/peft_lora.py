"""PEFT LoRA (and MoE-PEFT's plain LoRA, which uses the same keys) -> a ``lora`` bank.

Keys: ``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`` with
lora_A [r, in] and lora_B [out, r], for every base layer type PEFT adapts here (``torch.nn.Linear``).
``fan_in_fan_out`` never changes them: PEFT keeps lora_A/lora_B as Linear weights and uses the
flag only when merging into a transposed (Conv1D) base weight, and forces it off for nn.Linear.
"""

from __future__ import annotations

import re

from ..bank import ExpertBank, LayerAdapters, LinearExperts
from ..errors import BankError
from ..fingerprint import ATTENTION_TARGETS, TARGETS, BaseFingerprint
from ..routing import RoutingConfig
from .checkpoint import Checkpoint, scaling_of

KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_A\.weight")


def convert_peft_lora(ckpt: Checkpoint, base: BaseFingerprint, name: str) -> ExpertBank:
    cfg = ckpt.config
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ckpt.config_error(f"peft_type {cfg.get('peft_type')!r} is not a LoRA")
    rank, alpha, use_rslora = ckpt.lora_hparams()
    for key, why in (
        ("rank_pattern", "per-module ranks"),
        ("alpha_pattern", "per-module alphas"),
        ("modules_to_save", "fully trained modules"),
        ("layer_replication", "layer replication"),
        ("lora_bias", "a bias on lora_B"),
    ):
        if cfg.get(key):
            raise ckpt.config_error(f"{key} is set: {why} are not supported; retrain or merge without it")
    if cfg.get("bias", "none") != "none":
        raise ckpt.config_error(f"bias {cfg.get('bias')!r}: trained biases are not supported (only 'none')")
    declared = ckpt.targets(required=False)

    ckpt.load_weights()
    layers = [LayerAdapters() for _ in range(base.num_hidden_layers)]
    scaling = scaling_of(rank, alpha, use_rslora)
    for key in ckpt.keys():
        m = KEY.fullmatch(key)
        if not m:
            continue  # lora_B keys and strays: taken below or refused by finish()
        i, module, target = int(m.group(1)), m.group(2), m.group(3)
        if target not in TARGETS or module != ("self_attn" if target in ATTENTION_TARGETS else "mlp"):
            continue
        if i >= base.num_hidden_layers:
            raise ckpt.config_error(f"weights adapt layer {i}, the base model has {base.num_hidden_layers} layers")
        prefix = key[: -len(".lora_A.weight")]
        in_f, out_f = base.linear_shape(target)
        a = ckpt.take(f"{prefix}.lora_A.weight", (rank, in_f))
        b = ckpt.take(f"{prefix}.lora_B.weight", (out_f, rank))
        layers[i].linears[target] = LinearExperts(lora_a=a.unsqueeze(0), lora_b=b.unsqueeze(0), scaling=scaling)
    ckpt.finish()

    used = tuple(t for t in TARGETS if any(t in layer.linears for layer in layers))
    if not used:
        raise BankError("holds no LoRA tensors", file=ckpt.weights_file)
    if declared is not None and set(used) - set(declared):
        raise ckpt.config_error(f"weights adapt {sorted(set(used) - set(declared))}, not in target_modules")
    return ExpertBank(
        name=name,
        version="1",
        kind="lora",
        base=base,
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        routing=RoutingConfig(strategy="none"),
        targets=used,
        layers=layers,
    )
