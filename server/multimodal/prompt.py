"""Prompts with images as the release builds them (ALGORITHMS.md §5; one concept: the prompt's ids).

``split_at_images``: a rendered prompt split at ``spec.image_token``, each piece tokenised without
special tokens, ``spec.tokens_per_image`` placeholder ids in each gap. The API layer
(``server.api.images.tokenize_with_images``) and the command line (``moleserve generate --image``,
``moleserve eval`` on image question sets, through ``image_chat_prompt``) both build their prompts
with it, so a question asked either way is the same token sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .inputs import ImageInput, MultiModalSpec


def split_at_images(tokenizer: Any, text: str, images: Sequence[tuple[torch.Tensor, str]],
                    spec: MultiModalSpec) -> tuple[list[int], list[ImageInput]]:
    """(prompt ids, the images' spans) for ``text`` holding one ``spec.image_token`` per image of
    ``images`` ((pixel_values, content_hash) pairs, in prompt order). Raises ValueError when the
    number of markers differs from the number of images."""
    pieces = text.split(spec.image_token)
    if len(pieces) != len(images) + 1:
        raise ValueError(f"the chat template rendered {len(pieces) - 1} image markers for {len(images)} images")
    ids: list[int] = []
    inputs: list[ImageInput] = []
    for piece, image in zip(pieces, [*images, None]):
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if image is not None:
            pixel_values, content_hash = image
            inputs.append(ImageInput(pixel_values, content_hash, len(ids), spec.tokens_per_image))
            ids.extend([spec.placeholder_token_id] * spec.tokens_per_image)
    return ids, inputs


def image_chat_prompt(tokenizer: Any, spec: MultiModalSpec, question: str, pixel_values: torch.Tensor,
                      content_hash: str) -> tuple[list[int], list[ImageInput]]:
    """One user turn asking ``question`` about one image, rendered as the release renders it: the
    image first, a newline, the question, through the model's chat template with the assistant
    header appended (what a chat request ``[image_url part, text part]`` becomes)."""
    content = spec.image_token + "\n" + question.replace(spec.image_token, "").strip()
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return split_at_images(tokenizer, text, [(pixel_values, content_hash)], spec)
