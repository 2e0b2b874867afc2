"""Offline training of expert banks on a frozen base model (``moleserve train``).

``train(TrainConfig)`` writes a bank folder the server loads as it is; ``TrainableBank`` and
``TrainingAdapterStep`` run a bank differentiably inside ``server.model.LlamaModel``.
"""

from .config import ConfigError, TrainConfig
from .data import DataError, Example, alpaca_prompt, load_examples
from .modules import BankSpec, TrainableBank, TrainingAdapterStep
from .trainer import TrainResult, train

__all__ = [
    "BankSpec", "ConfigError", "DataError", "Example", "TrainConfig", "TrainResult", "TrainableBank",
    "TrainingAdapterStep", "alpaca_prompt", "load_examples", "train",
]
