"""The bank runtime: banks in a pooled device slot space, executed per step inside the model.

``BankRegistry`` (registry.py) is the engine's AdapterProvider and the server's bank admin;
``BankStep`` (step.py) is one step's AdapterStep; ``SlotPool`` (pool.py) holds the weights.
"""

from .layout import BankLayout, build_layout
from .pool import PackedBank, PoolState, SlotPool
from .registry import (BankAdminError, BankHandle, BankLoadError, BankNotFound, BankPathRefused, BankRegistry,
                       BankVersion, serving_bank_dtype)
from .step import BankStep, StepBank

__all__ = [
    "BankAdminError", "BankHandle", "BankLayout", "BankLoadError", "BankNotFound", "BankPathRefused",
    "BankRegistry", "BankStep", "BankVersion", "PackedBank", "PoolState", "SlotPool", "StepBank", "build_layout",
    "serving_bank_dtype",
]
