"""``moleserve generate``: greedy completion of one prompt on the base model, for a quick check."""

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


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from server.model.generate import greedy_generate
    from server.model.parrot import load_model_with_vision

    path = resolve_model_path(args.model)
    model, _ = load_model_with_vision(path, vision_tower=args.vision_tower)  # the vision side is checked, unused
    tok = AutoTokenizer.from_pretrained(path)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tok(args.prompt)["input_ids"]
    out = greedy_generate(model, [list(ids)], args.max_tokens, model.config.eos_token_ids)[0]
    print(tok.decode(out, skip_special_tokens=True))
    return 0
