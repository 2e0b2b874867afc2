"""Multimodal inputs: how an image travels from a chat request into the engine.

The API layer decodes and checks the image (``media``), turns it into pixel values with the tower's
processor (``image_processor``) and writes ``spec.tokens_per_image`` placeholder ids into the prompt;
the engine only sees "positions with precomputed embeddings" (``inputs``): the model runner encodes
each new image once (tower + projector, cached by content hash) and feeds the result at those
positions.
"""

from .inputs import ImageInput, ImageSpan, MultiModalSpec

__all__ = ["ImageInput", "ImageSpan", "MultiModalSpec"]
