"""``moleserve generate``: greedy completion of one prompt on the base model, for a quick check; with
``--image``, a question about one image to a model with a vision tower (a Parrot checkpoint),
through the serving engine as a chat request with that image would run."""

from __future__ import annotations

import argparse

from .common import add_model_argument, add_vision_argument, resolve_model_path

HELP = "greedy-complete a prompt with the base model (a quick check that a model folder works)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_vision_argument(parser)
    parser.add_argument("prompt", help="text to complete")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--image", metavar="PATH",
                        help="an image file (PNG, JPEG, WebP, GIF) to ask the prompt about: a Parrot checkpoint (one "
                             "image per prompt, as released); the prompt is a chat user turn, the image first")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from server.model.generate import greedy_generate
    from server.model.parrot import load_model_with_vision, release_stop_ids

    path = resolve_model_path(args.model)
    model, vision = load_model_with_vision(path, vision_tower=args.vision_tower)
    tok = AutoTokenizer.from_pretrained(path)
    if args.image is not None:
        print(_ask_about_image(model, vision, tok, path, args))
        return 0
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tok(args.prompt)["input_ids"]
    eos = tuple(model.config.eos_token_ids)
    out = greedy_generate(model, [list(ids)], args.max_tokens, eos + release_stop_ids(vision, tok, eos))[0]
    print(tok.decode(out, skip_special_tokens=True))
    return 0


def _ask_about_image(model, vision, tokenizer, path, args: argparse.Namespace) -> str:
    """The greedy answer to ``args.prompt`` about ``args.image``, through the engine (the image's
    embeddings at its placeholder span, the release's prompt)."""
    from pathlib import Path

    from adapters.evaluate import EngineGenerator
    from server.cli import UserError
    from server.engine.protocol import InvalidRequest
    from server.multimodal.media import MediaError, MediaPolicy, decode_image
    from server.multimodal.prompt import image_chat_prompt

    if vision is None:
        raise UserError("--image needs a model with a vision tower: a Parrot checkpoint (or --vision-tower DIR with "
                        "a parrot bank, served by `moleserve serve`)")
    if vision.adapter is None:
        raise UserError("--image: this base has a tower and no projector of its own; its images need a parrot bank, "
                        "which `moleserve serve --banks DIR` serves")
    image = Path(args.image).expanduser()
    try:
        loaded = decode_image(image.read_bytes(), MediaPolicy())
    except OSError as exc:
        raise UserError(f"--image {str(image)!r}: {exc.strerror or exc}") from None
    except MediaError as exc:
        raise UserError(f"--image {str(image)!r}: {exc}") from None
    generator = EngineGenerator(model, tokenizer, model_path=str(path), max_num_seqs=1, kv_cache_memory=None,
                                vision=vision)
    spec = generator.engine.multimodal_spec
    ids, images = image_chat_prompt(tokenizer, spec, args.prompt, spec.processor(loaded.image), loaded.content_hash)
    try:
        out = generator.generate([ids], args.max_tokens, images=[images])[0]
    except InvalidRequest as exc:  # the engine refused the request (e.g. the prompt is over the model's limit)
        raise UserError(str(exc)) from None
    return tokenizer.decode(out, skip_special_tokens=True)
