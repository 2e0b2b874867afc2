"""The first-run bank: a small DynMoLE bank trained once on a slice of the shared commonsense train
sets, so a fresh ``make serve`` has one real bank to serve.

``ensure_first_run_bank(cache_dir)`` returns ``<cache_dir>/banks/commonsense-dynmole``, training it
first when missing: 4 experts, r=8, at most 100 steps of 8 sequences drawn (seeded) from 400
records, stopped after ``max_seconds`` (default 240 s of optimisation, under 5 minutes in all).
It trains in a temporary folder and renames it into place, under a file lock, so a concurrent
caller either waits or finds the finished bank; a reader never sees half a bank. Run it in its own
process (``python -m adapters.train.first_run [CACHE_DIR]``): torch's thread count is per process,
so training inside the server would change the server's.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from .config import TrainConfig

BANK_NAME = "commonsense-dynmole"
SETS = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa")


def commonsense_data_dir() -> Path:
    """``$MOLESERVE_COMMONSENSE_DATA``, else ``../shared/data/commonsense`` next to the project."""
    env = os.environ.get("MOLESERVE_COMMONSENSE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data" / "commonsense"


def first_run_config(out: Path, data_dir: Path, *, model: str | None = None, max_seconds: float = 240.0,
                     threads: int | None = 1) -> TrainConfig:
    """One thread by default: it trains beside a serving process on a small machine, and on a
    busy CPU a second OpenMP thread waiting at every op's barrier made steps 5x slower (measured)."""
    files = [str(data_dir / s / "train.json") for s in SETS if (data_dir / s / "train.json").is_file()]
    if not files:
        raise FileNotFoundError(f"no commonsense train sets under {data_dir} (set MOLESERVE_COMMONSENSE_DATA)")
    return TrainConfig(data=files, out=str(out), model=model, kind="dynmole", name=BANK_NAME, experts=4, rank=8,
                       lr=1e-3, batch_size=8, micro_batch_size=4, max_steps=100, max_seconds=max_seconds,
                       cutoff=192, limit=400, seed=0, progress=False, threads=threads)


def ensure_first_run_bank(cache_dir: str | Path, *, model: str | None = None, max_seconds: float = 240.0) -> Path:
    """The first-run bank's folder, trained now if it is not there yet (blocking; call it in the
    background and hot-load the result)."""
    target = Path(cache_dir) / "banks" / BANK_NAME
    if (target / "bank.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{BANK_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "bank.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{BANK_NAME}.", dir=target.parent))
        try:
            from .trainer import train

            train(first_run_config(tmp, commonsense_data_dir(), model=model, max_seconds=max_seconds))
            (tmp / "checkpoint.pt").unlink(missing_ok=True)  # the bank is complete; no resume needed
            tmp.chmod(0o755)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    import argparse
    import time

    from server.model.embedded import cache_dir as default_cache_dir

    parser = argparse.ArgumentParser(description="train the first-run bank if it is not cached yet")
    parser.add_argument("cache_dir", nargs="?", default=None)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    path = ensure_first_run_bank(args.cache_dir or default_cache_dir(), model=args.model)
    print(f"{path} ({time.perf_counter() - t0:.0f} s)")
