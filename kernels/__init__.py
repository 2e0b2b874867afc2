"""Kernels: routers and routed (mixture-of-LoRA-experts) GEMMs.  Semantics: docs/ALGORITHMS.md §2.

The contract other modules call is exported here; backends live under `kernels.routed_lora`.
"""

from kernels.pairs import PairPlan, plan_from_dense, plan_from_slots, slots_from_dense
from kernels.routed_lora import BACKENDS, routed_lora, routed_lora_torch
from kernels.routing import dynamic_route, topk_route, tsallis_entropy

__all__ = [
    "BACKENDS",
    "PairPlan",
    "dynamic_route",
    "plan_from_dense",
    "plan_from_slots",
    "routed_lora",
    "routed_lora_torch",
    "slots_from_dense",
    "topk_route",
    "tsallis_entropy",
]
