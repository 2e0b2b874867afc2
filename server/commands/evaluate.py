"""``moleserve eval``: accuracy of a bank (or the base model) on LLM-Adapters-format sets, or of a
model with a vision tower (a Parrot checkpoint) on LLaVA-format image question sets (exact match)."""

from __future__ import annotations

import argparse

from .common import add_model_argument, add_vision_argument

HELP = ("accuracy of a bank or the base model on LLM-Adapters multiple-choice / true-false sets, or of a Parrot "
        "model on LLaVA-format image questions (exact match)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_vision_argument(parser)
    parser.add_argument("--bank", metavar="DIR", help="bank folder (or a converted checkpoint); default: the base model alone")
    parser.add_argument("--data", action="append", required=True, metavar="FILE",
                        help="test file (repeatable): LLM-Adapters records, or LLaVA-format image questions "
                             "({image, conversations}: greedy answer vs the gpt turn, exact match; engine runner)")
    parser.add_argument("--image-folder", metavar="DIR",
                        help="image questions: the folder image paths are relative to (default: the data file's)")
    parser.add_argument("--limit", type=int, help="the first N items of each file")
    parser.add_argument("--mode", choices=("generate", "loglik"), default="generate",
                        help="generate: greedy generation + the papers' answer extraction (default); "
                             "loglik: the most likely answer label")
    parser.add_argument("--runner", choices=("engine", "local"), default="engine",
                        help="through the serving engine (default; loglik mode uses its prompt log-probabilities) "
                             "or the trainer's model and adapter step in this process")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    parser.add_argument("--max-tokens", type=int, default=32, help="generate mode: new tokens at most")
    parser.add_argument("--kv-cache-memory", type=int, default=256 << 20, metavar="BYTES",
                        help="engine runner: bytes of KV cache (default 256 MiB; a 7B model with image prompts needs more)")
    parser.add_argument("--bank-dtype", choices=("model", "auto", "float32", "bfloat16", "float16", "int8"),
                        default="model",
                        help="engine runner: storage dtype of the bank's expert weights (model: the model's dtype, "
                             "the default; auto: as `moleserve serve` stores them, int8 on a quantized CPU base, float16 "
                             "for a float32 CPU model; "
                             "int8: CPU only, as `serve --bank-dtype int8`)")
    parser.add_argument("--json", metavar="OUT", help="write the results (accuracy, per-set numbers, predictions) here")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from adapters.evaluate import EngineGenerator, LocalRunner, evaluate_set, format_table, load_eval_set, set_name, summary
    from adapters.evaluate.images import evaluate_image_set, is_image_record, load_image_questions
    from adapters.train.data import read_records
    from adapters.train import DataError
    from server.cli import UserError
    from server.model.parrot import load_model_with_vision

    from .common import resolve_model_path

    path = resolve_model_path(args.model)
    model, vision = load_model_with_vision(path, vision_tower=args.vision_tower)
    tokenizer = AutoTokenizer.from_pretrained(path)
    bank = None
    if args.bank:
        from adapters import BaseFingerprint, load_bank

        bank = load_bank(args.bank, base=BaseFingerprint.from_hf_config(model.config.raw))
    runner = None
    if args.runner == "local":
        if bank is not None and bank.kind == "parrot":
            raise UserError("a parrot bank runs through the serving engine; drop --runner local")
        runner = LocalRunner(model, bank, batch_size=args.batch_size)
        generator = scorer = runner
    else:
        import torch

        from adapters.runtime import serving_bank_dtype

        bank_dtype = (None if args.bank_dtype == "model"
                      else serving_bank_dtype(model.dtype, model.device, getattr(model, "quantization", "none"))
                      if args.bank_dtype == "auto" else getattr(torch, args.bank_dtype))
        generator = scorer = EngineGenerator(model, tokenizer, bank, model_path=str(path),
                                             max_num_seqs=args.batch_size, kv_cache_memory=args.kv_cache_memory,
                                             vision=vision, bank_dtype=bank_dtype)
    results = []
    try:
        for file in args.data:
            records = read_records(file)
            name = set_name(file)
            taken = {r.name for r in results}
            name = next(f"{name}#{k}" for k in range(2, len(taken) + 3) if f"{name}#{k}" not in taken) if name in taken else name
            if records and is_image_record(records[0]):
                if generator is runner:
                    raise UserError(f"{file}: image questions run through the serving engine; drop --runner local")
                items = load_image_questions(file, image_folder=args.image_folder, limit=args.limit)
                results.append(evaluate_image_set(name, items, tokenizer, generator, max_tokens=args.max_tokens))
            else:
                items = load_eval_set(file, args.limit)
                results.append(evaluate_set(name, items, tokenizer, mode=args.mode, generator=generator,
                                            scorer=scorer, max_tokens=args.max_tokens))
            print(format_table(results[-1:]).splitlines()[-1], flush=True)
    except DataError as exc:
        raise UserError(str(exc)) from None
    print(format_table(results))
    if args.json:
        report = summary(results, bank=args.bank, model=str(path), mode=args.mode, limit=args.limit,
                         runner="serving engine" if generator is not runner else "local model + training adapter step")
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0
