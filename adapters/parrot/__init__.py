"""Parrot (ALGORITHMS.md §5): a text-guided mixture of experts over an image's visual tokens.

``config`` (the checkpoint's vision-side keys, the serving routing mode), ``modules`` (projector,
mixture and the ``VisualAdapter`` that holds both, with the release's state-dict keys).
"""

from .config import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, ParrotConfig, ParrotConfigError, VisualRouting
from .modules import Expert, VisualAdapter, VisualMixture, VisualRoute, build_projector

__all__ = [
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "Expert",
    "ParrotConfig",
    "ParrotConfigError",
    "VisualAdapter",
    "VisualMixture",
    "VisualRoute",
    "VisualRouting",
    "build_projector",
]
