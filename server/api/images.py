"""Images in chat requests: content parts of type ``image_url`` -> checked, decoded, pre-processed
``ImageInput``s and a prompt with their placeholder spans (one concept: a chat request's images).

The order the serving code follows, cheapest refusal first:

1. ``image_parts(messages)``: every content part's type is known, image parts sit in user messages;
2. ``ChatImages.check``: the model takes images (``engine.multimodal_spec``), not too many, and a
   tower-only base is asked through a ``parrot`` bank;
3. ``ChatImages.load``: fetch, decode and pre-process each image on the media threads (never the
   event loop, never the tokenizer thread: a slow or huge image delays only its own request);
4. ``render_content`` then ``tokenize_with_images`` (on the tokenizer thread): the chat template
   renders each image as ``spec.image_token`` (an image part followed by text: the marker, a newline,
   the text, as the release's prompts are), the rendered prompt is split at the marker, each piece
   tokenised without special tokens, and ``spec.tokens_per_image`` placeholder ids joined in.

Any failure is an ``APIError`` 400 whose ``param`` names the part (``messages[0].content[1]``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from server.multimodal.inputs import ImageInput, MultiModalSpec
from server.multimodal.media import MediaError, MediaPolicy, load_image
from server.multimodal.prompt import split_at_images

from .errors import APIError

PART_TYPES = ("text", "image_url")
MEDIA_THREADS = 4


@dataclass(frozen=True)
class ImagePart:
    param: str  # where it is in the request: messages[i].content[j]
    url: str


@dataclass(frozen=True)
class PreparedImage:
    param: str
    pixel_values: torch.Tensor  # [3, H, W] float32
    content_hash: str


def image_parts(messages: Sequence[Any]) -> list[ImagePart]:
    """The request's image parts in prompt order; a part of another type, or an image outside a user
    message, is a 400 naming it."""
    found = []
    for i, m in enumerate(messages):
        if not isinstance(m.content, list):
            continue
        for j, part in enumerate(m.content):
            param = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if part.text is None:
                    raise APIError(400, f"{param}: a text part needs 'text'", param=param)
            elif part.type == "image_url":
                url = part.image_url if isinstance(part.image_url, str) else getattr(part.image_url, "url", None)
                if not url:
                    raise APIError(400, f"{param}: an image_url part needs image_url.url", param=param)
                if m.role != "user":
                    raise APIError(400, f"{param}: images are taken in user messages only, not in {m.role!r} ones",
                                   param=param)
                found.append(ImagePart(param, url))
            else:
                raise APIError(400, f"{param}: content parts of type {part.type!r} are not supported "
                                    f"(supported: {', '.join(PART_TYPES)})", param=param)
    return found


def render_content(content: Any, image_token: str | None) -> str:
    """A message's content as the chat template's string: text parts joined, each image part as
    ``image_token``, with a newline between an image and the text that follows it."""
    if not isinstance(content, list):
        return content or ""
    out: list[str] = []
    previous_image = False
    for part in content:
        if part.type == "image_url":
            out.append(image_token or "")
            previous_image = True
        else:
            out.append(("\n" if previous_image else "") + (part.text or ""))
            previous_image = False
    return "".join(out)


def check_marker_free(messages: Sequence[Any], image_token: str) -> None:
    """In a request with images, no text may carry the marker itself: it would split the prompt
    where no image is."""
    for i, m in enumerate(messages):
        parts = m.content if isinstance(m.content, list) else [None]
        for j, part in enumerate(parts):
            text = m.content if part is None else (part.text if part.type == "text" else None)
            if text and image_token in text:
                param = f"messages[{i}].content" + ("" if part is None else f"[{j}]")
                raise APIError(400, f"{param}: the text contains the image marker {image_token!r}; send images as "
                                    "image_url parts", param=param)


def tokenize_with_images(tokenizer: Any, text: str, images: Sequence[PreparedImage],
                         spec: MultiModalSpec) -> tuple[list[int], list[ImageInput]]:
    """The rendered prompt split at ``spec.image_token``, each piece tokenised (no special tokens
    added) and ``spec.tokens_per_image`` placeholders in each gap: (prompt ids, the images' spans)."""
    try:
        return split_at_images(tokenizer, text, [(i.pixel_values, i.content_hash) for i in images], spec)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None


class ChatImages:
    """The serving side of a chat request's images: the checks against the served model, and the
    threads that fetch, decode and pre-process them."""

    def __init__(self, engine: Any, policy: MediaPolicy | None):
        self.engine = engine
        self.policy = policy or MediaPolicy()
        self._executor = ThreadPoolExecutor(max_workers=MEDIA_THREADS, thread_name_prefix="media")

    @property
    def spec(self) -> MultiModalSpec | None:
        return getattr(self.engine, "multimodal_spec", None)

    def check(self, parts: Sequence[ImagePart], bank: str | None, bank_kinds: dict[str, str]) -> MultiModalSpec:
        """The spec the request's images are prepared for; 400 naming the first part that cannot be taken."""
        spec = self.spec
        first = parts[0].param
        if spec is None:
            raise APIError(400, f"{first}: this model takes no images (it has no vision tower)", param=first)
        if len(parts) > spec.max_images:
            extra = parts[spec.max_images].param
            raise APIError(400, f"{extra}: the request has {len(parts)} images; this model takes at most "
                                f"{spec.max_images}", param=extra)
        if spec.needs_bank:
            names = bank.split("+") if bank else []
            if not any(bank_kinds.get(n) == "parrot" for n in names):
                which = f"{bank!r} is not a parrot bank" if bank else "the base model has no projector of its own"
                raise APIError(400, f"{first}: {which}; image requests to this model must name a parrot bank in "
                                    "`model` (GET /v1/models lists them with kind 'parrot')", param=first)
        if spec.processor is None:
            raise APIError(400, f"{first}: this model's vision tower has no image processor", param=first)
        return spec

    async def load(self, parts: Sequence[ImagePart], spec: MultiModalSpec) -> list[PreparedImage]:
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self._executor, self._prepare, part, spec) for part in parts]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)  # type: ignore[arg-type]

    def _prepare(self, part: ImagePart, spec: MultiModalSpec) -> PreparedImage:
        try:
            loaded = load_image(part.url, self.policy)
        except MediaError as exc:
            raise APIError(400, f"{part.param}: {exc}", param=part.param) from None
        pixel_values = spec.processor(loaded.image)
        return PreparedImage(part.param, pixel_values, loaded.content_hash)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
