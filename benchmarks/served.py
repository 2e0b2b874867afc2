"""Served throughput: the same requests through ``moleserve serve`` over HTTP (API key on, streaming
and not) and through the engine in-process, plus transformers' batched ``generate``; prints the
BENCHMARKS.md table ("Served throughput").

    python benchmarks/served.py [--threads 2] [--concurrency 32] [--new-tokens 64] [--repeats 2]
                                [--workloads short long] [--skip-hf] [--skip-mixlora] [--dynmole] [--only-banks]
                                [--client-nice N] [--sampling JSON]

Workloads: N requests of prompt token ids (seeded random), ``short`` 30-44 tokens (a chat turn's
size), ``long`` 64-128 tokens (benchmarks/engine.py's); N new tokens each, greedy, ignore_eos. The
server runs as its own process, started once, as a user runs it; the client (aiohttp, all N requests
at once on one event loop, as a load generator does) runs in this process. Systems alternate within
each repeat, every other repeat in the reverse order (ABC CBA ...), so the machine's load and its
drift within a repeat hit them alike; the best run of each is reported, and beside
the best-against-best ratio the median over the repeats of each repeat's own ratio (robust to a
stretch of load that favours one system's best run). The in-process
engine is the one ``moleserve serve`` builds from the same flags (int4 base weights by default).

Every run sends prompts of its own: the workload's prompts (the same lengths for every system)
with a first token unique to the run, so each run prefills its prompts and none reads KV blocks an
earlier run left in its prefix cache (``--reuse-prompts``: the same prompts every run, as before;
then whichever system runs first pays the prefill and the later ones read it from the cache).

A second table gives CPU seconds per 1000 tokens, of the whole server process and of its event loop
(the main thread), next to the in-process engine's, counted over the timed requests only (not the
client's warm-up request, which the in-process engine does not make): CPU time is what the served
path adds whatever the machine's load. Beside it, the client's own CPU (this process, warm-up
included): the load generator shares the server's 2 cores, which a real client's machine does not;
``--client-nice N`` runs it at nice N so it takes the cores' idle time (a diagnostic, not the default).
A third: 16 requests over 4 MixLoRA banks served (``--banks``) vs transformers + the ``mixlora``
package (benchmarks/banks.py's peer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

KEY = "bench-key"
# Sampling fields of every request, served and in-process (``--sampling``): greedy by default.
SAMPLING: dict = {"temperature": 0}


def prompts_for(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_flags(max_num_seqs: int, extra: list[str]) -> list[str]:
    """The ``moleserve serve`` flags of every served system; the in-process engine is built from the
    same flags (``in_process_engine``), so both run the same weights (the served default quantizes
    the base to int4: an unquantized in-process engine would compare different models)."""
    return ["--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", "512", "--kv-cache-memory",
            str(512 << 20), "--log-level", "warning", *extra]


def in_process_engine(flags: list[str]):
    """The ``LLMEngine`` ``moleserve serve <flags>`` runs (``build_engine``, one source of settings)."""
    from server.commands.serve import build_engine
    from server.settings import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    engine, _ = build_engine(settings_from_args(parser.parse_args(flags)))
    return engine.engine


def start_server(threads: int, flags: list[str], tree: Path | None = None,
                 env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, MOLESERVE_API_KEY=KEY, OMP_NUM_THREADS=str(threads), **(env_extra or {}))
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *flags]
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


async def served(url: str, prompts: list[list[int]], new_tokens: int, stream: bool,
                 models: list[str] | None = None, pid: int | None = None) -> tuple[float, int, list, tuple | None]:
    """Wall time, completion tokens, each request's token count and, given the server's ``pid``, its
    CPU seconds over those requests (``process_cpu``: event loop, whole process), all requests at
    once (request i asks for ``models[i]``, a bank, when given). The client is aiohttp where installed: it parses a
    stream for about a quarter of httpx's CPU (0.12 vs 0.46-0.59 CPU-s per 32 x 64-token run), and
    the client shares the server's 2 cores (vLLM's serving benchmark uses aiohttp for the same
    reason); httpx otherwise."""
    try:
        import aiohttp
    except ImportError:
        return await served_httpx(url, prompts, new_tokens, stream, models, pid)
    body = dict(max_tokens=new_tokens, ignore_eos=True, stream=stream, **SAMPLING)
    headers = {"Authorization": f"Bearer {KEY}"}
    connector = aiohttp.TCPConnector(limit=len(prompts) + 4)
    async with aiohttp.ClientSession(base_url=url, headers=headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as client:
        async def one(p: list[int], model: str | None = None) -> int:
            body_p = {**body, "prompt": p, **({"model": model} if model else {})}
            if not stream:
                async with client.post("/v1/completions", json=body_p) as r:
                    r.raise_for_status()
                    return (await r.json())["usage"]["completion_tokens"]
            tokens = 0  # from the usage chunk: a chunk may carry several tokens when the client lags
            async with client.post("/v1/completions", json={**body_p, "stream_options": {"include_usage": True}}) as r:
                r.raise_for_status()
                async for line in r.content:
                    if line.startswith(b"data: {") and b"completion_tokens" in line:  # the usage chunk
                        usage = json.loads(line[6:]).get("usage")
                        tokens = usage["completion_tokens"] if usage else tokens
            return tokens

        return await timed(one, prompts, models, pid)


async def timed(one, prompts: list[list[int]], models: list[str] | None, pid: int | None = None
                ) -> tuple[float, int, list, tuple | None]:
    """Both clients' run: one warm-up request (connection set-up, a warm server), then every request
    at once; (wall seconds, completion tokens, each request's tokens, the server's CPU seconds over
    them when ``pid`` is given). The warm-up is neither timed nor counted: 64 tokens at batch 1
    cost the server ~0.8 CPU-s per 1000 tokens of a 32 x 64 run, which the in-process engine never
    pays."""
    await one(prompts[0][:8])
    cpu0 = process_cpu(pid) if pid is not None else None
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(p, models[i] if models else None) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - t0
    cpu = None if cpu0 is None else tuple(b - a for a, b in zip(cpu0, process_cpu(pid)))
    return wall, sum(counts), counts, cpu


async def served_httpx(url: str, prompts: list[list[int]], new_tokens: int, stream: bool,
                       models: list[str] | None = None, pid: int | None = None) -> tuple[float, int, list, tuple | None]:
    """``served`` with httpx."""
    import httpx

    body = dict(max_tokens=new_tokens, ignore_eos=True, stream=stream, **SAMPLING)
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        async def one(p: list[int], model: str | None = None) -> int:
            body_p = {**body, "prompt": p, **({"model": model} if model else {})}
            if not stream:
                r = await client.post("/v1/completions", json=body_p)
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]
            tokens = 0  # from the usage chunk: a chunk may carry several tokens when the client lags
            stream_body = {**body_p, "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/completions", json=stream_body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        tokens = usage["completion_tokens"] if usage else tokens
            return tokens

        return await timed(one, prompts, models, pid)


def in_process(engine, prompts: list[list[int]], new_tokens: int) -> float:
    from server.engine.protocol import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, **SAMPLING)
    t0 = time.perf_counter()
    engine.generate([GenerationRequest(f"b{i}-{time.monotonic_ns()}", p, params) for i, p in enumerate(prompts)])
    return time.perf_counter() - t0


def own_prompts(prompts: list[list[int]], run: int) -> list[list[int]]:
    """``prompts`` with first token ``100 + run``: the same lengths, but no full KV block in common
    with another run's, so the prefix cache gives one run nothing another computed."""
    return [[100 + run] + p[1:] for p in prompts]


def process_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of process ``pid``'s main thread (the server's event loop) and of
    all its threads (the step thread, OpenMP's, the tokenizer workers' too); Linux /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(stat: Path) -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    return cpu(Path(f"/proc/{pid}/task/{pid}/stat")), cpu(Path(f"/proc/{pid}/stat"))


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


def mixlora_table(args: argparse.Namespace, flags: list[str], folder: Path) -> None:
    """16 requests over 4 MixLoRA banks served (``--banks``, streaming and not) vs transformers + the
    ``mixlora`` package (benchmarks/banks.py's peer and requests: 16-token prompts, greedy)."""
    import tempfile

    from banks import PROMPT_LEN, mixlora_peer, requests

    from adapters import BaseFingerprint
    from server.model import ModelConfig
    from tests.adapters.bank_builders import write_mixlora

    cfg = ModelConfig.from_folder(folder)
    fp, vocab = BaseFingerprint.from_hf_config(cfg.raw), cfg.vocab_size
    names, nt = [f"mix{i}" for i in range(4)], min(args.new_tokens, 16)
    with tempfile.TemporaryDirectory() as tmp:
        folders = [Path(tmp) / name for name in names]
        for i, bank in enumerate(folders):
            write_mixlora(bank, fp, r=16, alpha=32, num_experts=8, top_k=2, seed=i,
                          targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        reqs = requests(16, names, nt, vocab, seed=4)
        prompts, models = [r.prompt_token_ids for r in reqs], [r.bank for r in reqs]
        proc, url = start_server(args.threads, [*flags, "--banks", tmp])
        try:
            rates: dict[str, list[float]] = {}
            systems = [False, True] + ([] if args.skip_hf else [None])  # streaming or not; None: the peer
            for rep in range(args.repeats):  # alternate, every other repeat in the reverse order
                for stream in (systems if rep % 2 == 0 else systems[::-1]):
                    if stream is None:
                        wall, tokens = mixlora_peer(folder, folders, reqs, nt)
                        rates.setdefault("transformers + mixlora", []).append(tokens / wall)
                        continue
                    wall, tokens, counts, _ = asyncio.run(served(url, prompts, nt, stream, models))
                    assert tokens == 16 * nt, (tokens, counts)
                    rates.setdefault(f"served, {'streaming' if stream else 'non-streaming'}", []).append(tokens / wall)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    best = {k: max(v) for k, v in rates.items()}
    peer = best.get("transformers + mixlora")
    print(f"\n| 16 requests over 4 MixLoRA banks ({PROMPT_LEN}-token prompts, {nt} new tokens; 8 experts top-2, r=16, "
          "all 7 targets) | tok/s (runs) | vs transformers + mixlora (goal >= 5x) |\n| --- | --- | --- |")
    for system, runs in rates.items():
        print(f"| {system} | {best[system]:.1f} ({', '.join(f'{r:.1f}' for r in runs)}) | "
              f"{f'{best[system] / peer:.2f}x' if peer else '-'} |", flush=True)


def dynmole_table(args: argparse.Namespace, flags: list[str], folder: Path) -> None:
    """32 requests over 8 DynMoLE banks vs 32 requests on the base alone, both served by one
    ``moleserve serve --banks`` (its defaults: the int4 base, the int8 bank pool), alternating
    (issue #21: banks on the quantized base >= 0.8x the quantized base alone). With
    ``--dynmole-in-process``, the same two workloads through the engine that ``serve`` builds from
    the same flags, in this process, alternating with the served runs: what the served path adds to
    a bank step beyond a base step."""
    import tempfile

    from banks import PROMPT_LEN, requests, save_dynmole_banks

    from adapters import BaseFingerprint
    from server.model import ModelConfig

    cfg = ModelConfig.from_folder(folder)
    fp, vocab = BaseFingerprint.from_hf_config(cfg.raw), cfg.vocab_size
    nt, n = args.new_tokens, 32
    with tempfile.TemporaryDirectory() as tmp:
        names = save_dynmole_banks(Path(tmp), fp)
        reqs = requests(n, names, nt, vocab, seed=5)
        prompts = [r.prompt_token_ids for r in reqs]
        proc, url = start_server(args.threads, [*flags, "--banks", tmp])
        engine = in_process_engine([*flags, "--banks", tmp]) if args.dynmole_in_process else None
        try:
            asyncio.run(served(url, prompts[:8], 4, False, names))  # warm: every bank's first step
            if engine is not None:
                bank_run(engine, prompts[:8], names, 4)
            rates: dict[str, list[float]] = {}
            systems = [(label, models, path) for label, models in (("base alone", None),
                                                                   ("over 8 DynMoLE banks", [r.bank for r in reqs]))
                       for path in ("served", *(("in-process",) if engine is not None else ()))]
            for rep in range(args.repeats):  # alternate, every other repeat in the reverse order
                for label, models, path in (systems if rep % 2 == 0 else systems[::-1]):
                    if path == "served":
                        wall, tokens, counts, _ = asyncio.run(served(url, prompts, nt, True, models))
                        assert tokens == n * nt, (tokens, counts)
                        rates.setdefault(label, []).append(tokens / wall)
                    else:
                        wall = bank_run(engine, prompts, models, nt)
                        rates.setdefault(f"{label}, in-process", []).append(n * nt / wall)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    best = {k: max(v) for k, v in rates.items()}
    print(f"\n| {n} requests served, streaming ({PROMPT_LEN}-token prompts, {nt} new tokens; 6 experts, r=16, "
          "gate/up/down) | tok/s (runs) | vs base alone (goal >= 0.8x) | vs base alone, median of the rounds |"
          "\n| --- | --- | --- | --- |")
    for system, runs in rates.items():
        ref = "base alone, in-process" if system.endswith("in-process") else "base alone"
        print(f"| {system} | {best[system]:.1f} ({', '.join(f'{r:.1f}' for r in runs)}) | "
              f"{best[system] / best[ref]:.2f}x | {paired(runs, rates[ref]):.2f}x |", flush=True)


def paired(runs: list[float], ref: list[float]) -> float:
    """The median over the rounds of run / the same round's reference run: the systems alternate
    within a round, so a stretch of machine load that spans a round hits both (best against best
    compares whichever runs got the quiet moments)."""
    return statistics.median(a / b for a, b in zip(runs, ref))


def bank_run(engine, prompts: list[list[int]], models: list[str] | None, new_tokens: int) -> float:
    """Seconds for ``prompts`` through the in-process ``engine``, request i on bank ``models[i]``."""
    from server.engine.protocol import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, **SAMPLING)
    t0 = time.perf_counter()
    engine.generate([GenerationRequest(f"d{i}-{time.monotonic_ns()}", p, params, bank=models[i] if models else None)
                     for i, p in enumerate(prompts)])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--skip-hf", action="store_true", help="no transformers baselines (generate, + mixlora)")
    ap.add_argument("--skip-mixlora", action="store_true", help="no 4-MixLoRA-banks table")
    ap.add_argument("--dynmole", action="store_true", help="also the 8-DynMoLE-banks vs base table (issue #21)")
    ap.add_argument("--dynmole-in-process", action="store_true",
                    help="the DynMoLE table also runs both workloads through the engine in-process (each row's "
                         "ratio against its own path's base)")
    ap.add_argument("--only-banks", action="store_true", help="only the bank tables (MixLoRA unless skipped, DynMoLE if asked)")
    ap.add_argument("--server-args", default="", help="extra `moleserve serve` flags, space-separated")
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="also serve from this checkout (e.g. the commit before a change), alternating with this one")
    ap.add_argument("--server-env", nargs="*", default=[], help="NAME=VALUE for the server process (this tree's)")
    ap.add_argument("--client-nice", type=int, default=0,
                    help="run the load generator (this process's main thread) at this nice value, so it takes the "
                         "cores' idle time as a client on another machine would, not the server's (the in-process "
                         "engine runs on the same thread, with nothing else running then)")
    ap.add_argument("--reuse-prompts", action="store_true",
                    help="the same prompts every run (the first run of each system pays their prefill, later runs "
                         "read it from the prefix cache); default: prompts of its own per run")
    ap.add_argument("--sampling", type=json.loads, default=None,
                    help='JSON sampling fields for every served and in-process request instead of greedy, e.g. '
                         '\'{"temperature": 0.8, "top_p": 0.9}\' (transformers stays greedy: use --skip-hf)')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.sampling is not None:
        SAMPLING.clear()
        SAMPLING.update(args.sampling)
    if args.client_nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.client_nice)  # Linux: this thread (the client's event loop)

    from server.model import ensure_default_model

    folder = ensure_default_model()
    env_extra = dict(kv.split("=", 1) for kv in args.server_env)
    flags = serve_flags(max(64, args.concurrency), args.server_args.split())
    if args.only_banks:
        if not args.skip_mixlora:
            mixlora_table(args, flags, folder)
        if args.dynmole:
            dynmole_table(args, flags, folder)
        return
    servers = {"served": start_server(args.threads, flags, env_extra=env_extra)}
    if args.baseline_tree is not None:
        servers["served (baseline)"] = start_server(args.threads, flags, tree=args.baseline_tree)
    try:
        engine = in_process_engine(flags)
        hf = None
        if not args.skip_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        vocab = engine.model_config.vocab_size
        in_process(engine, prompts_for(2, vocab, 8, 8, 99), 4)  # warm-up
        n, nt = args.concurrency, args.new_tokens
        # CPU seconds per 1000 tokens, summed over the runs: [event loop, whole process]
        cpu: dict[str, list] = {}
        run_no = 0  # a distinct first token per run (``own_prompts``)

        def next_prompts(prompts: list[list[int]]) -> list[list[int]]:
            nonlocal run_no
            run_no += 1
            return prompts if args.reuse_prompts else own_prompts(prompts, run_no)

        print("| workload | system | tok/s (runs) | vs engine in-process | vs engine in-process, median of the rounds "
              "| vs transformers generate |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name in args.workloads:
            lo, hi = WORKLOADS[name]
            prompts = prompts_for(n, vocab, lo, hi, seed=n + lo)
            rates: dict[str, list[float]] = {}
            # A repeat runs every system once, in this order and the next repeat in the reverse order (a
            # host whose speed drifts within a repeat then favours no system by its place in it).
            systems: list[tuple[str, object]] = [("engine in-process", None)]
            systems += [(f"{label}, {'streaming' if stream else 'non-streaming'}", (proc, url, stream))
                        for label, (proc, url) in servers.items() for stream in (False, True)]
            if hf is not None:
                systems.append(("transformers generate", None))
            for rep in range(args.repeats):
                for system, spec in (systems if rep % 2 == 0 else systems[::-1]):
                    c0 = time.process_time()
                    if system == "engine in-process":
                        rates.setdefault(system, []).append(n * nt / in_process(engine, next_prompts(prompts), nt))
                        acc = cpu.setdefault(system, [0.0, 0.0, 0, [], 0.0])
                        acc[1] += time.process_time() - c0
                        acc[2] += n * nt
                        acc[3].append(1000 * (time.process_time() - c0) / (n * nt))
                    elif system == "transformers generate":
                        rates.setdefault(system, []).append(n * nt / hf_generate(hf, next_prompts(prompts), nt, pad))
                    else:
                        proc, url, stream = spec
                        wall, tokens, counts, (loop_s, all_s) = asyncio.run(
                            served(url, next_prompts(prompts), nt, stream, pid=proc.pid))
                        assert tokens == n * nt, (tokens, counts)
                        rates.setdefault(system, []).append(tokens / wall)
                        acc = cpu.setdefault(system, [0.0, 0.0, 0, [], 0.0])
                        acc[0] += loop_s
                        acc[1] += all_s
                        acc[2] += tokens
                        acc[3].append(1000 * all_s / tokens)
                        acc[4] += time.process_time() - c0  # the client's (its warm-up request included)
            best = {k: max(v) for k, v in rates.items()}
            for system, runs in rates.items():
                vs_hf = f"{best[system] / best['transformers generate']:.2f}x" if hf is not None else "-"
                print(f"| {name} ({lo}-{hi} tok), {n} concurrent | {system} | {best[system]:.1f} "
                      f"({', '.join(f'{r:.1f}' for r in runs)}) | {best[system] / best['engine in-process']:.2f}x | "
                      f"{paired(runs, rates['engine in-process']):.2f}x | {vs_hf} |", flush=True)
        # CPU time does not depend on how busy the machine is the way wall time does: where the
        # served path spends more than the engine, per token, whatever the load.
        # The client's CPU: the load generator shares the server's cores here, where a real client's would not.
        print("\n| system | CPU s / 1000 tokens, whole process (runs) | of which the event loop (main thread) "
              "| the client's, beside it |")
        print("| --- | --- | --- | --- |")
        for system, (loop_s, all_s, tokens, per_run, client_s) in cpu.items():
            served_row = system != "engine in-process"
            loop = f"{1000 * loop_s / tokens:.2f}" if served_row else "-"
            client = f"{1000 * client_s / tokens:.2f}" if served_row else "-"
            print(f"| {system} | {1000 * all_s / tokens:.2f} ({', '.join(f'{r:.2f}' for r in per_run)}) | {loop} "
                  f"| {client} |", flush=True)
        if not args.skip_mixlora:
            del engine, hf  # their memory, before the banks' server and the peer's models load
            mixlora_table(args, flags, folder)
        if args.dynmole:
            dynmole_table(args, flags, folder)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
