"""Expert banks: the on-disk format, validated loading, and conversion from the ecosystem's formats.

The rest of the server uses ``load_bank`` and the ExpertBank objects it returns.
"""

from .bank import ExpertBank, LayerAdapters, LinearExperts, linear_name, tensor_name
from .errors import BankError
from .fingerprint import TARGETS, BaseFingerprint
from .kinds import KINDS
from .loader import load_bank
from .paths import resolve_bank_path
from .routing import RoutingConfig
from .validation import validate_bank

__all__ = [
    "KINDS",
    "TARGETS",
    "BankError",
    "BaseFingerprint",
    "ExpertBank",
    "LayerAdapters",
    "LinearExperts",
    "RoutingConfig",
    "linear_name",
    "load_bank",
    "resolve_bank_path",
    "tensor_name",
    "validate_bank",
]
