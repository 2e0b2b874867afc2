"""The ``moleserve`` console script: one subcommand per module, each with ``add_arguments`` and ``run``.

Command modules stay light at import (argparse only) so ``moleserve --help`` is instant; heavy
imports happen inside ``run``. A user's mistake (bad path, bad model, bad bank) ends with one line
on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module with `HELP`, `add_arguments(parser)` and `run(args) -> int`
COMMANDS = {
    "generate": "server.commands.generate",
    "serve": "server.commands.serve",
    "convert": "server.commands.convert",
    "factorize": "server.commands.factorize",
    "train": "server.commands.train",
    "eval": "server.commands.evaluate",
    "vision-tower": "server.commands.vision_tower",
}


class UserError(Exception):
    """A problem with the user's input; reported as one line, exit code 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from server.model.errors import ModelLoadError

    types: list[type[BaseException]] = [UserError, ModelLoadError]
    try:
        from adapters.errors import BankError  # noqa: PLC0415 - optional until banks land
    except ImportError:
        try:
            from adapters.bank import BankError  # noqa: PLC0415
        except ImportError:
            BankError = None  # type: ignore[assignment]
    if BankError is not None:
        types.append(BankError)
    return tuple(types)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="moleserve", description="Serve and train mixture-of-LoRA-experts banks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, path in COMMANDS.items():
        mod = importlib.import_module(path)
        # A command that parses its own arguments (convert) sets PASSTHROUGH = True.
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, add_help=not getattr(mod, "PASSTHROUGH", False))
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, modules = build_parser()
    if argv and getattr(modules.get(argv[0]), "PASSTHROUGH", False):
        args = argparse.Namespace(command=argv[0], argv=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except _user_error_types() as exc:
        print(f"moleserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Under `python -m server.cli` this file runs as __main__; call the importable module's main so
    # the error classes it catches are the same ones the commands raise.
    from server.cli import main as _main

    sys.exit(_main())
