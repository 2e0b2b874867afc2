"""The base model: config, weights, the flat-batch Llama-family forward, and the default model."""

from .attention import SequenceKVCache, causal_attention
from .config import ModelConfig
from .context import AdapterStep, AttentionStep, StepContext, get_step_context, step_context
from .embedded import DEFAULT_MODEL_NAME, default_model_path, ensure_default_model
from .errors import ModelLoadError
from .llama import LlamaModel, load_model
from .layers import TargetLinear

__all__ = [
    "AdapterStep", "AttentionStep", "DEFAULT_MODEL_NAME", "LlamaModel", "ModelConfig", "ModelLoadError",
    "SequenceKVCache", "StepContext", "TargetLinear", "causal_attention", "default_model_path",
    "ensure_default_model", "get_step_context", "load_model", "step_context",
]
