"""FactorLLM (docs/ALGORITHMS.md §4): the base model's dense FFNs split into routed experts.

``factorize`` builds a ``factor`` bank (neuron permutation, routers trained with the
Prior-Approximate loss on calibration text); ``load_factor_weights`` + ``factor_mlp`` serve it,
computing only each token's top-k experts through the pair machinery of ``kernels``.
"""

from .bank import build_factor_bank, validate_factor_bank
from .kernel import expert_outputs, factor_ffn, factor_ffn_reference, factor_route, pack_experts
from .serving import FactorLayer, FactorStep, FactorWeights, factor_mlp, load_factor_weights

__all__ = [
    "FactorLayer",
    "FactorStep",
    "FactorWeights",
    "build_factor_bank",
    "expert_outputs",
    "factor_ffn",
    "factor_ffn_reference",
    "factor_mlp",
    "factor_route",
    "load_factor_weights",
    "pack_experts",
    "validate_factor_bank",
]
