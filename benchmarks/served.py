"""Served throughput: the same requests through ``moleserve serve`` over HTTP (API key on, streaming
and not) and through the engine in-process, plus transformers' batched ``generate``; prints the
BENCHMARKS.md table ("Served throughput").

    python benchmarks/served.py [--threads 2] [--concurrency 32] [--new-tokens 64] [--repeats 2]
                                [--workloads short long] [--skip-hf]

Workloads: N requests of prompt token ids (seeded random), ``short`` 30-44 tokens (a chat turn's
size), ``long`` 64-128 tokens (benchmarks/engine.py's); N new tokens each, greedy, ignore_eos. The
server runs as its own process, started once, as a user runs it; the client (httpx, all N requests
at once on one event loop, as a load generator does) runs in this process. Systems alternate within
each repeat so the machine's load hits them alike; the best run of each is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

KEY = "bench-key"


def prompts_for(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int, max_num_seqs: int, extra: list[str], tree: Path | None = None,
                 env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, MOLESERVE_API_KEY=KEY, OMP_NUM_THREADS=str(threads), **(env_extra or {}))
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--max-num-seqs", str(max_num_seqs),
           "--max-num-batched-tokens", "512", "--kv-cache-memory", str(512 << 20), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, env=env, cwd=tree or Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become ready")


async def served(url: str, prompts: list[list[int]], new_tokens: int, stream: bool) -> tuple[float, int, list]:
    """Wall time, completion tokens and each request's token count, all requests at once."""
    import httpx

    body = dict(max_tokens=new_tokens, temperature=0, ignore_eos=True, stream=stream)
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        async def one(p: list[int]) -> int:
            if not stream:
                r = await client.post("/v1/completions", json={**body, "prompt": p})
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]
            tokens = 0  # from the usage chunk: a chunk may carry several tokens when the client lags
            stream_body = {**body, "prompt": p, "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/completions", json=stream_body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        tokens = usage["completion_tokens"] if usage else tokens
            return tokens

        await one(prompts[0][:8])  # connection set-up and a warm server
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - t0, sum(counts), counts


def in_process(engine, prompts: list[list[int]], new_tokens: int) -> float:
    from server.engine.protocol import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.generate([GenerationRequest(f"b{i}-{time.monotonic_ns()}", p, params) for i, p in enumerate(prompts)])
    return time.perf_counter() - t0


def hf_generate(hf, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=pad_id)
    return time.perf_counter() - t0


WORKLOADS = {"short": (30, 44), "long": (64, 128)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--server-args", default="", help="extra `moleserve serve` flags, space-separated")
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="also serve from this checkout (e.g. the commit before a change), alternating with this one")
    ap.add_argument("--server-env", nargs="*", default=[], help="NAME=VALUE for the server process (this tree's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.model import ensure_default_model

    folder = ensure_default_model()
    env_extra = dict(kv.split("=", 1) for kv in args.server_env)
    servers = {"served": start_server(args.threads, max(64, args.concurrency), args.server_args.split(),
                                      env_extra=env_extra)}
    if args.baseline_tree is not None:
        servers["served (baseline)"] = start_server(args.threads, max(64, args.concurrency), args.server_args.split(),
                                                    tree=args.baseline_tree)
    try:
        engine = LLMEngine(EngineConfig(model=folder, device="cpu", dtype="float32", kv_cache_memory=512 << 20,
                                        max_num_seqs=max(64, args.concurrency), max_num_batched_tokens=512))
        hf = None
        if not args.skip_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        vocab = engine.model_config.vocab_size
        in_process(engine, prompts_for(2, vocab, 8, 8, 99), 4)  # warm-up
        n, nt = args.concurrency, args.new_tokens
        print("| workload | system | tok/s (runs) | vs engine in-process | vs transformers generate |")
        print("| --- | --- | --- | --- | --- |")
        for name in args.workloads:
            lo, hi = WORKLOADS[name]
            prompts = prompts_for(n, vocab, lo, hi, seed=n + lo)
            rates: dict[str, list[float]] = {}
            for _ in range(args.repeats):  # alternate the systems within each repeat
                rates.setdefault("engine in-process", []).append(n * nt / in_process(engine, prompts, nt))
                for label, (_, url) in servers.items():
                    for stream in (False, True):
                        wall, tokens, counts = asyncio.run(served(url, prompts, nt, stream))
                        assert tokens == n * nt, (tokens, counts)
                        rates.setdefault(f"{label}, {'streaming' if stream else 'non-streaming'}", []).append(tokens / wall)
                if hf is not None:
                    rates.setdefault("transformers generate", []).append(n * nt / hf_generate(hf, prompts, nt, pad))
            best = {k: max(v) for k, v in rates.items()}
            for system, runs in rates.items():
                vs_hf = f"{best[system] / best['transformers generate']:.2f}x" if hf is not None else "-"
                print(f"| {name} ({lo}-{hi} tok), {n} concurrent | {system} | {best[system]:.1f} "
                      f"({', '.join(f'{r:.1f}' for r in runs)}) | {best[system] / best['engine in-process']:.2f}x | {vs_hf} |",
                      flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
