"""Subcommands of the ``moleserve`` console script (see server/cli.py)."""
