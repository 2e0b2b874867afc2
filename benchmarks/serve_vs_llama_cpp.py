"""moleserve vs llama.cpp (llama-cpp-python's OpenAI server) over HTTP, on the embedded default's own
GGUF file; prints the BENCHMARKS.md table ("Quantized base vs llama.cpp").

    python benchmarks/serve_vs_llama_cpp.py [--quantizations none auto int8] [--concurrency 1 8 32]
                                            [--tokens 64] [--rounds 2] [--threads 2] [--no-llama-cpp]

Systems, all started once and measured in alternation, round by round (the machine is shared: load
hits each system alike): one ``moleserve serve`` per ``--quantizations`` value (``auto`` serves the
GGUF's Q4_1 blocks as stored, ``none`` today's fp32 weights) and ``python -m llama_cpp.server`` on
the same GGUF (``--threads`` threads, one slot, as it ships). Each round sends N concurrent
``/v1/completions`` requests (distinct prompts of ~100 tokens, greedy, ``--tokens`` new tokens each:
moleserve with ``ignore_eos``, llama.cpp with the EOS token's logit biased to -100) and reports
completion tokens / wall seconds; the table keeps each system's best round and its median.

llama-cpp-python is built from source from PyPI into its own virtualenv under
``$MOLESERVE_CACHE/bench/llama-cpp-venv`` (~10+ minutes the first time), never into the project's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_CPP = "llama-cpp-python[server]==0.3.36"
WORDS = ("river stone light winter garden paper music window silver market forest engine letter cloud "
         "harbor mountain candle story bridge orchard lantern meadow canyon violin").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_cpp_python() -> Path:
    """The benchmark's own virtualenv with llama-cpp-python's server, built on first use."""
    from server.model.embedded import cache_dir

    venv = cache_dir() / "bench" / "llama-cpp-venv"
    py = venv / "bin" / "python"
    ok = py.is_file() and subprocess.run([str(py), "-c", "import llama_cpp.server"], capture_output=True).returncode == 0
    if not ok:
        print(f"building {LLAMA_CPP} into {venv} (from source, ~10+ minutes) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", LLAMA_CPP], check=True,
                       env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
    return py


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


class System:
    def __init__(self, name: str, cmd: list[str], ready_path: str, extra_body: dict, env: dict | None = None):
        self.name, self.extra_body = name, extra_body
        self.port = free_port()
        cmd = cmd + ["--port", str(self.port)]
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})})
        self.ready_path = ready_path
        self.rounds: dict[int, list[float]] = {}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prompts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [f"Write a long story that uses these words: {' '.join(rng.choices(WORDS, k=60))}. Story:"
            for _ in range(n)]


async def one_round(system: System, texts: list[str], tokens: int) -> float:
    """completion tokens / wall seconds of len(texts) concurrent greedy completions."""
    import httpx

    async with httpx.AsyncClient(base_url=system.base, timeout=1800) as client:
        async def one(text: str) -> int:
            body = {"prompt": text, "max_tokens": tokens, "temperature": 0.0, **system.extra_body}
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(t) for t in texts))
        return sum(done) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantizations", nargs="*", default=["none", "auto"], help="none given: llama.cpp alone")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()

    from server.model import ensure_default_model
    from server.model.embedded import _gguf_path

    folder = ensure_default_model()
    gguf = _gguf_path()
    systems: list[System] = []
    try:
        env = {"OMP_NUM_THREADS": str(args.threads)}
        for q in args.quantizations:
            systems.append(System(f"moleserve {q}", [sys.executable, "-m", "server.cli", "serve", "--model", str(folder),
                                                     "--quantization", q, "--max-num-seqs", "64",
                                                     "--log-level", "warning"],
                                  "/ready", {"ignore_eos": True}, env))
        if not args.no_llama_cpp:
            py = llama_cpp_python()
            systems.append(System("llama.cpp", [str(py), "-m", "llama_cpp.server", "--model", str(gguf),
                                                "--n_threads", str(args.threads), "--n_ctx", "4096",
                                                "--host", "127.0.0.1"],
                                  "/v1/models", {"logit_bias": {"2": -100.0}}))
        for s in systems:
            wait_ready(s.base + s.ready_path, s.proc, 1800)
            # warm up with one request: after concurrent requests llama-cpp-python's server runs at about
            # half its speed for a while (BENCHMARKS.md), which would put its first rounds in that state
            asyncio.run(one_round(s, prompts(1, 0), 4))
        for n in args.concurrency:
            for r in range(args.rounds):
                texts = prompts(n, seed=1000 * n + r)
                order = systems if r % 2 == 0 else systems[::-1]
                for s in order:
                    s.rounds.setdefault(n, []).append(asyncio.run(one_round(s, texts, args.tokens)))
                    print(f"  n={n} round {r}: {s.name} {s.rounds[n][-1]:.1f} tok/s", flush=True)
    finally:
        for s in systems:
            s.stop()

    ref = next((s for s in systems if s.name == "llama.cpp"), None)
    print(f"\n{args.tokens} greedy tokens per request, {args.threads} threads, best (median) of {args.rounds} "
          f"alternating rounds, completion tokens / wall s over HTTP\n")
    ours = [s for s in systems if s is not ref]
    ratios = [f"{s.name} / llama.cpp" for s in ours] if ref else []
    print("| concurrent | " + " | ".join([s.name for s in systems] + ratios) + " |")
    print("|---" * (1 + len(systems) + len(ratios)) + "|")
    for n in args.concurrency:
        cells = [f"{max(s.rounds[n]):.1f} ({statistics.median(s.rounds[n]):.1f})" for s in systems]
        if ref is not None:
            cells += [f"{max(s.rounds[n]) / max(ref.rounds[n]):.2f}x" for s in ours]
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
