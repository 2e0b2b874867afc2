"""Keeping bank paths inside the folders the operator allowed."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import BankError


def resolve_bank_path(path: str | Path, allowed_roots: Iterable[str | Path]) -> Path:
    """The real path of the bank folder ``path``, refused unless it lies inside one of
    ``allowed_roots`` once ``..`` and symlinks are resolved.

    The files directly inside the folder are checked too: a ``weights.safetensors`` that is a
    symlink to a file outside the roots is refused like the folder itself would be.
    """
    roots = [Path(r).resolve() for r in allowed_roots]
    if not roots:
        raise BankError(f"bank path {str(path)!r} refused: no folders are allowed for banks")
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise BankError(f"bank path {str(path)!r} does not exist") from None
    if not _inside(real, roots):
        raise BankError(f"bank path {str(path)!r} is outside the allowed folders ({', '.join(map(str, roots))})")
    if real.is_dir():
        for child in real.iterdir():
            try:
                target = child.resolve(strict=True)
            except (OSError, RuntimeError):
                raise BankError(f"bank path {str(path)!r}: {child.name} is a broken link") from None
            if not _inside(target, roots):
                raise BankError(f"bank path {str(path)!r}: {child.name} points outside the allowed folders")
    return real


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)
