"""The contract between the API layer and the engine for images (one concept: inputs).

A prompt with an image is a list of token ids in which the image occupies ``length`` consecutive
placeholder positions starting at ``offset``; ``ImageInput`` carries what the engine needs to fill
them. ``MultiModalSpec`` is what the served model publishes so the API layer can build such prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt, decoded, checked and pre-processed by the API layer.

    pixel_values: [3, H, W] float32, the tower's processor output (resize, crop, normalise; Parrot's
    pad-to-square included). content_hash: hex digest of the decoded image (mode, size, pixels), the
    key of the engine's encoder cache (tower + projector output depends on the image alone).
    offset / length: the image's placeholder span in ``GenerationRequest.prompt_token_ids``.
    """

    pixel_values: torch.Tensor
    content_hash: str
    offset: int
    length: int


@dataclass(frozen=True)
class MultiModalSpec:
    """What the served model takes, published by the engine (``None`` for a text-only model).

    tokens_per_image: placeholder positions per image (Parrot-7B: 577 = 576 patches + CLS).
    max_images: images per prompt the model supports (the release: 1).
    placeholder_token_id: the id written at image positions (never embedded: the engine overwrites
    those rows; any valid vocabulary id).
    image_token: the marker the chat template's content carries where the image goes; the rendered
    prompt is split at it and tokenised in pieces (no special tokens added to the pieces).
    processor: PIL.Image (RGB) -> pixel_values [3, H, W].
    needs_bank: True when the base model has a tower but no projector of its own, so an image request
    must name a ``parrot`` bank (which supplies the projector and mixture).
    """

    tokens_per_image: int
    max_images: int
    placeholder_token_id: int
    processor: Callable[[Any], torch.Tensor]
    image_token: str = "<image>"
    needs_bank: bool = False


@dataclass(frozen=True)
class ImageSpan:
    """An image's placeholder span as the engine keeps it on a ``Sequence`` (``Sequence.mm_spans``).

    cache_key: a digest of everything that shapes the embeddings fed at the span (the image's
    content hash, every text token of the prompt, the visual adapter's identity and the routing
    mode): the mixture reads the prompt's text, so a KV block overlapping the span may be shared
    only between prompts with the same key (ALGORITHMS.md §5, serving consequence (a)).
    """

    offset: int
    length: int
    cache_key: str
