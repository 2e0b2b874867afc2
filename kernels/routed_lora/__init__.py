"""Routed LoRA: the reference, the CPU path, the Triton path, and the dispatch between them."""

from kernels.routed_lora.dispatch import BACKENDS, routed_lora
from kernels.routed_lora.torch_ops import routed_lora_torch

__all__ = ["BACKENDS", "routed_lora", "routed_lora_torch"]
