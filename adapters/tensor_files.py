"""Reading tensor files that may be hostile: safetensors checked header-first, pickles weights-only.

Nothing is allocated for a tensor before the file has been shown to hold all of its bytes, and a
pickle is never given the chance to run code (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import torch
from torch import Tensor

from .errors import BankError

MAX_HEADER_BYTES = 16 << 20
MAX_FILE_BYTES = 32 << 30
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def read_json_file(path: Path, max_bytes: int, file: str) -> object:
    """A small JSON file that may be hostile: a regular file only, at most ``max_bytes``, nesting
    that the parser survives; errors name ``file``."""
    try:
        size = _file_size(path)
    except BankError as exc:
        raise exc.within(file=file) from None
    if size > max_bytes:
        raise BankError(f"larger than {max_bytes} bytes", file=file)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise BankError("not valid JSON (nested too deeply)", file=file) from None
    except (OSError, ValueError) as exc:
        raise BankError(f"not valid JSON ({_one_line(exc)})", file=file) from None


def read_safetensors(path: Path, expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, Tensor]:
    """All tensors of ``path`` as fp32 CPU tensors.

    The header is checked first: float dtypes only, offsets inside the file and consistent with
    the shapes, no missing bytes; with ``expected`` the names and shapes must match it exactly.
    Errors name the file (``path.name``) and the tensor.
    """
    try:
        _check_safetensors_header(path, expected)
        from safetensors.torch import load_file

        tensors = load_file(str(path), device="cpu")
    except BankError as exc:
        raise exc.within(file=path.name) from None
    except Exception as exc:  # the library's own errors for anything the header check let through
        raise BankError(f"cannot be read as safetensors ({_one_line(exc)})", file=path.name) from None
    return {name: t.float().contiguous() for name, t in tensors.items()}


def _check_safetensors_header(path: Path, expected: dict[str, tuple[int, ...]] | None) -> None:
    size = _file_size(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise BankError(f"truncated: {size} bytes, too short for a safetensors header")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise BankError(f"header length {n} does not fit the file ({size} bytes): truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise BankError("header is not valid JSON: corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise BankError("header is not a JSON object: corrupt or not safetensors")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    end_max = 0
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise BankError(f"tensor {name}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in FLOAT_DTYPES:
            raise BankError(f"tensor {name} has dtype {dtype!r}, expected one of {', '.join(FLOAT_DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise BankError(f"tensor {name} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[1] - offsets[0] != math.prod(shape) * FLOAT_DTYPES[dtype]
        ):
            raise BankError(f"tensor {name} has data offsets {offsets!r} that do not match its shape {tuple(shape)}")
        if offsets[1] > data_size:
            raise BankError(f"truncated: tensor {name} needs {offsets[1]} data bytes, the file holds {data_size}")
        end_max = max(end_max, offsets[1])
    if expected is not None:
        missing = [k for k in expected if k not in header]
        if missing:
            raise BankError(f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unexpected = [k for k in header if k not in expected]
        if unexpected:
            raise BankError(f"unexpected tensor {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        for k, shape in expected.items():
            if tuple(header[k]["shape"]) != tuple(shape):
                raise BankError(f"tensor {k} has shape {tuple(header[k]['shape'])}, expected {tuple(shape)}")


def read_torch_pickle(path: Path) -> dict[str, Tensor]:
    """A ``.bin`` state dict loaded with ``weights_only=True``: a pickle that would build any
    object other than tensors and plain containers is refused, not run."""
    _file_size(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BankError(
            f"cannot be read as a weights-only torch checkpoint ({_one_line(exc)})", file=path.name
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise BankError("is not a flat state dict of named tensors", file=path.name)
    for k, v in state.items():
        if not v.is_floating_point():
            raise BankError(f"tensor {k} has dtype {v.dtype}, expected a float dtype", file=path.name)
    return {k: v.float().contiguous() for k, v in state.items()}


def _file_size(path: Path) -> int:
    """The size of ``path``, refusing anything but a regular file: opening a FIFO (or a device)
    would block the load forever, so nothing here opens a path before this check."""
    try:
        st = path.stat()
    except OSError as exc:
        raise BankError(f"cannot be read ({exc.strerror or exc})", file=path.name) from None
    if not stat.S_ISREG(st.st_mode):
        raise BankError("is not a regular file (a FIFO, device or socket is never opened)", file=path.name)
    size = st.st_size
    if size > MAX_FILE_BYTES:
        raise BankError(f"is {size} bytes, more than the {MAX_FILE_BYTES} byte limit", file=path.name)
    return size


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
