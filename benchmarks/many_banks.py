"""Thousands of banks, loaded on demand (issue #17): 1,000 small random DynMoLE banks under one root,
Zipf-distributed requests (s = 1.1), 16 concurrent streams, at most 32 banks resident, served over
HTTP by ``moleserve serve --load-banks-on-demand --max-loaded-banks 32``; against the same requests
mapped onto 16 banks loaded at start (``--banks``). Prints the tables of BENCHMARKS.md ("Banks on
demand").

    python benchmarks/many_banks.py [--banks 1000] [--requests 400] [--rounds 2] [--tokens 16] [--skip-hiccup]

The tiny random model (2 layers, hidden 64; the tests' model) and its banks are generated once
into ``$MOLESERVE_CACHE/bench/many_banks``. Both servers run at once, each its own process; the
rounds alternate between them. TTFT is measured by the client (streamed, first token); a request
counts as "not resident" when its bank was not among the 32 the client most recently asked for (a
client-side LRU, the server's own policy), and the server's counters (loads, misses, evictions)
are printed next to it. Memory: the servers' RSS, and the most banks resident at any scrape.

The second section measures the step-time hiccup of loads: 16 streams decode in an engine while a
thread loads banks one after another; step times with a load in flight vs without.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PROMPT = "the quick brown fox jumps over the lazy dog " * 2


def cache() -> Path:
    from server.model.embedded import cache_dir  # noqa: PLC0415

    return cache_dir() / "bench" / "many_banks"


def prepare(n_banks: int) -> tuple[Path, Path, Path]:
    """(model folder, root of n_banks banks, folder of 16 banks), generated once."""
    from server.model import ensure_default_model  # noqa: PLC0415
    from tests.adapters.bank_builders import fingerprint_of, random_bank  # noqa: PLC0415
    from tests.conftest import make_tiny_model  # noqa: PLC0415

    base = cache()
    model = base / "tiny-llama"
    if not (model / "config.json").exists():
        make_tiny_model(model, ensure_default_model())
    fp = fingerprint_of(model)
    root, sixteen = base / f"root-{n_banks}", base / "sixteen"
    for folder, count in ((root, n_banks), (sixteen, 16)):
        for i in range(count):
            name = f"bank{i:04d}"
            if not (folder / name / "bank.json").exists():
                bank = random_bank("dynmole", fp, r=8, experts_per_layer=(4,), seed=i, name=name)
                with torch.no_grad():
                    for layer in bank.layers:
                        for lin in layer.linears.values():
                            lin.lora_b.mul_(0.05)
                bank.save(folder / name)
    return model, root, sixteen


def zipf_ranks(n_requests: int, n_banks: int, s: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** s for k in range(n_banks)]
    order = list(range(n_banks))
    rng.shuffle(order)  # popularity not in name order
    return [order[k] for k in rng.choices(range(n_banks), weights=weights, k=n_requests)]


class Server:
    def __init__(self, name: str, model: Path, args: list[str], port: int):
        self.name, self.port = name, port
        env = {**os.environ, "MOLESERVE_LOG_LEVEL": "warning"}
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", str(model),
                                      "--port", str(port), "--kv-cache-memory", str(64 << 20),
                                      "--max-num-seqs", "16", "--admin-key", "bench", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{port}"

    def wait(self, timeout=300) -> None:
        import httpx  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready")

    def rss_mib(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def run_round(url: str, models: list[str], tokens: int, concurrency: int, lru: OrderedDict | None,
                    resident_max: list[int]) -> tuple[float, list[tuple[float, bool]], int]:
    """Send ``models`` (one request each) with ``concurrency`` streams; (seconds, [(ttft, resident)], tokens)."""
    import httpx  # noqa: PLC0415

    queue = list(reversed(models))
    ttfts: list[tuple[float, bool]] = []
    produced = 0
    errors: list[str] = []

    async with httpx.AsyncClient(base_url=url, timeout=300, headers={"Authorization": "Bearer bench"},
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker():
            nonlocal produced
            while queue:
                model = queue.pop()
                resident = True
                if lru is not None:  # the client's view of the server's LRU of 32
                    resident = model in lru
                    lru[model] = None
                    lru.move_to_end(model)
                    while len(lru) > 32:
                        lru.popitem(last=False)
                body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                t0 = time.perf_counter()
                first = None
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"{model}: {r.status_code} {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"text"' in line:
                            if first is None:
                                first = time.perf_counter() - t0
                            produced += 1
                ttfts.append((first or 0.0, resident))

        async def sampler():
            while queue:
                text = (await client.get("/metrics")).text
                resident_max[0] = max(resident_max[0], int(metric(text, "moleserve_banks_loaded")))
                await asyncio.sleep(0.25)

        t0 = time.perf_counter()
        await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
        dt = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[:3]}")
    return dt, ttfts, produced


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def serving(args) -> None:
    model, root, sixteen = prepare(args.banks)
    on_demand = Server("on-demand", model, ["--bank-root", str(root), "--load-banks-on-demand",
                                            "--max-loaded-banks", "32", "--bank-dtype", "float32"], args.port)
    preloaded = Server("16 loaded", model, ["--banks", str(sixteen), "--bank-dtype", "float32"], args.port + 1)
    try:
        on_demand.wait()
        preloaded.wait()
        ranks = zipf_ranks(args.requests * args.rounds, args.banks, 1.1, seed=0)
        lru: OrderedDict = OrderedDict()
        totals = {"on-demand": [0.0, 0], "16 loaded": [0.0, 0]}
        ttft_od: list[tuple[float, bool]] = []
        ttft_pre: list[float] = []
        resident_max = [0]
        ignore = [0]
        # warm both (first requests compile kernels, fill caches); not counted
        asyncio.run(run_round(preloaded.url, ["bank0000"] * 16, args.tokens, 16, None, ignore))
        asyncio.run(run_round(on_demand.url, ["bank0000"] * 16, args.tokens, 16, None, ignore))
        for rnd in range(args.rounds):
            part = ranks[rnd * args.requests:(rnd + 1) * args.requests]
            order = [("on-demand", on_demand), ("16 loaded", preloaded)]
            if rnd % 2:
                order.reverse()
            for name, server in order:
                if server is on_demand:
                    models = [f"bank{k:04d}" for k in part]
                    dt, tt, n = asyncio.run(run_round(server.url, models, args.tokens, 16, lru, resident_max))
                    ttft_od += tt
                else:
                    models = [f"bank{k % 16:04d}" for k in part]
                    dt, tt, n = asyncio.run(run_round(server.url, models, args.tokens, 16, None, ignore))
                    ttft_pre += [t for t, _ in tt]
                totals[name][0] += dt
                totals[name][1] += n
                print(f"round {rnd}: {name}: {len(models)} requests, {n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s)")
        import httpx  # noqa: PLC0415

        text = httpx.get(on_demand.url + "/metrics").text
        banks = httpx.get(on_demand.url + "/v1/banks", headers={"Authorization": "Bearer bench"}).json()["data"]
        host_bytes = sum(b.get("bytes", 0) for b in banks if b.get("tier") in ("host", "pool"))
        tps = {k: n / dt for k, (dt, n) in totals.items()}
        distinct = len(set(ranks))
        print()
        print(f"{args.banks} banks on disk, {args.requests * args.rounds} requests over {distinct} distinct banks "
              f"(Zipf s=1.1), 16 concurrent, {args.tokens} tokens each, at most 32 resident")
        print()
        print("| server | tokens/s | ratio | TTFT p50 resident | p99 resident | p50 not resident | p99 not resident | RSS MiB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        res = [t for t, r in ttft_od if r]
        non = [t for t, r in ttft_od if not r]
        print(f"| on demand, 32 resident | {tps['on-demand']:.1f} | {tps['on-demand'] / tps['16 loaded']:.2f}x | "
              f"{pct(res, .5) * 1e3:.0f} ms | {pct(res, .99) * 1e3:.0f} ms | {pct(non, .5) * 1e3:.0f} ms | "
              f"{pct(non, .99) * 1e3:.0f} ms | {on_demand.rss_mib():.0f} |")
        print(f"| 16 banks loaded at start | {tps['16 loaded']:.1f} | 1.00x | {pct(ttft_pre, .5) * 1e3:.0f} ms | "
              f"{pct(ttft_pre, .99) * 1e3:.0f} ms | - | - | {preloaded.rss_mib():.0f} |")
        print()
        loads = metric(text, "moleserve_bank_loads_total", '{result="ok",trigger="on_demand"}')
        misses = metric(text, "moleserve_bank_misses_total", '{tier="host"}')
        evictions = metric(text, "moleserve_bank_evictions_total", '{tier="host"}')
        load_ms = metric(text, "moleserve_bank_load_seconds_sum") / max(metric(text, "moleserve_bank_load_seconds_count"), 1)
        resident_now = sum(1 for b in banks if b.get("tier") != "disk")
        print(f"requests counted resident / not: {len(res)} / {len(non)}; server: on-demand loads {loads:.0f}, "
              f"host misses {misses:.0f}, host evictions {evictions:.0f}, mean load {load_ms * 1e3:.1f} ms; most banks "
              f"resident at a scrape: {resident_max[0]} (bound 32); resident at the end: {resident_now}, holding "
              f"{host_bytes / 1e6:.2f} MB of bank weights")
    finally:
        on_demand.stop()
        preloaded.stop()


def hiccup(args) -> None:
    """Step times of 16 decoding streams while banks load on a thread, vs without loads."""
    from adapters.runtime import BankRegistry  # noqa: PLC0415
    from server.engine.config import EngineConfig  # noqa: PLC0415
    from server.engine.llm_engine import LLMEngine  # noqa: PLC0415
    from server.engine.protocol import GenerationRequest, SamplingParams  # noqa: PLC0415

    model, root, _ = prepare(args.banks)
    engine = LLMEngine(EngineConfig(model=model, device="cpu", dtype="float32", kv_cache_memory=64 << 20,
                                    max_num_seqs=16, max_num_batched_tokens=512))
    reg = BankRegistry(engine.model_config, allowed_roots=[root], max_loaded=32, on_demand=True)
    engine.set_adapter_provider(reg)
    for i in range(16):
        reg.load_sync(f"bank{i:04d}", root / f"bank{i:04d}", pinned=False)
    for i in range(16):
        engine.add_request(GenerationRequest(f"r{i}", list(range(10, 26)), SamplingParams(
            max_tokens=400, temperature=0.0, ignore_eos=True), bank=f"bank{i:04d}"))
    loading, go, stop = threading.Event(), threading.Event(), threading.Event()

    def loader():
        k = 16
        while not stop.is_set():
            if not go.wait(0.05):
                continue
            loading.set()
            reg.load_sync(f"bank{k:04d}", root / f"bank{k:04d}", pinned=False)  # past 32: evicts the LRU idle bank
            loading.clear()
            k = 16 + (k - 15) % (args.banks - 16)

    for _ in range(10):  # warm-up
        engine.step()
    with_load, without = [], []
    t = threading.Thread(target=loader, daemon=True)
    t.start()
    for block in range(2 * args.hiccup_blocks):  # loads on and off in alternating blocks: the same noise for both
        go.set() if block % 2 else go.clear()
        while loading.is_set():
            time.sleep(0.001)
        for _ in range(8):
            busy = loading.is_set()
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            (with_load if busy or loading.is_set() else without).append(dt)
    stop.set()
    t.join()
    loads = reg.residency_stats()
    print()
    print(f"step-time hiccup: 16 streams decoding, banks loading one after another on a thread "
          f"({loads.load_count} loads, mean {loads.load_sum / max(loads.load_count, 1) * 1e3:.1f} ms each)")
    print()
    print("| steps | n | median ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, xs in (("no load running", without), ("a load running", with_load)):
        print(f"| {name} | {len(xs)} | {statistics.median(xs) * 1e3:.2f} | {pct(xs, .99) * 1e3:.2f} | "
              f"{max(xs) * 1e3:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--banks", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=400, help="requests per round and server")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hiccup", action="store_true")
    ap.add_argument("--hiccup-blocks", type=int, default=8, help="blocks of 8 steps with loads (and as many without)")
    ap.add_argument("--skip-serving", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_serving:
        serving(args)
    if not args.skip_hiccup:
        hiccup(args)


if __name__ == "__main__":
    main()
