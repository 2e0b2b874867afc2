"""The GPU check: kernels on CUDA, greedy equality with transformers, routed-LoRA bandwidth, decode
tok/s eager vs CUDA graphs, and tokens/s with 8 DynMoLE banks vs the base model vs transformers + PEFT, on random-initialised Llama
configs. Prints the tables for BENCHMARKS.md ("GPU"). Run by ``scripts/gpu_check.sh``; fetches nothing.

    python benchmarks/gpu.py [--sizes 1b,8b] [--seqs 64] [--tokens 128] [--device cuda] [--skip-peer]
                             [--sections kernels,greedy,bandwidth,graphs,tokens]

``--device cpu --sizes tiny`` runs every section on the CPU at toy sizes (how the script itself is
tested on machines without a GPU; its numbers mean nothing there).

The tokenizer is a word-level one made here (random token ids need no real vocabulary); the models
are random (normal(0, 0.02) weights), so the text is noise but the work per token is the real one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SIZES = {  # Llama shapes; vocab kept at 32000 so the LM head does not dominate
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
}
ROWS: list[tuple[str, str, str]] = []  # (section, what, result) for the summary table


def row(section: str, what: str, result: str) -> None:
    ROWS.append((section, what, result))
    print(f"[{section}] {what}: {result}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# -- a model folder with a word-level tokenizer --------------------------------------------------

def model_folder(root: Path, size: str, *, save_weights: bool = False, seed: int = 0) -> Path:
    """config.json + tokenizer of a random Llama (weights saved only when asked: small sizes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    shape = SIZES[size]
    folder = root / f"llama-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {f"w{i}": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w1", eos_token="w2", unk_token="w0", pad_token="w2")
    fast.save_pretrained(folder)
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, tie_word_embeddings=False)
    cfg.save_pretrained(folder)
    if save_weights:
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def random_model(folder: Path, dev: torch.device, dtype: torch.dtype, seed: int = 0):
    """Our LlamaModel with normal(0, 0.02) weights, made on the device (no checkpoint to read)."""
    from server.model import LlamaModel, ModelConfig

    cfg = ModelConfig.from_folder(folder)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device=dev).to(dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


# -- 1. kernels on the device --------------------------------------------------------------------

def check_kernels(dev: torch.device) -> None:
    from kernels import plan_from_slots, routed_lora, routed_lora_torch
    from server.engine.paged_attention import paged_attention_torch
    from server.engine.paged_attention_triton import paged_attention_triton

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    shapes = ((32, 8, 128, 16, [1, 300, 2047]), (28, 4, 128, 32, [4000, 17]), (16, 16, 64, 16, [33, 512]),
              (8, 1, 256, 16, [100, 90]))
    lora_shapes = ((1, 2, 48, 16, 4096, 14336), (64, 6, 48, 16, 4096, 4096), (300, 2, 8, 64, 2048, 8192))
    if dev.type == "cpu":  # the interpreter: toy shapes
        shapes = ((4, 2, 16, 16, [1, 40]),)
        lora_shapes = ((3, 2, 6, 4, 32, 48),)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for heads, kv, d, bs, ctx in shapes:
            mb = max(-(-c // bs) for c in ctx)
            nb = len(ctx) * mb + 4
            kc = torch.randn(nb, bs, kv, d, generator=gen).to(dev, dtype)
            vc = torch.randn(nb, bs, kv, d, generator=gen).to(dev, dtype)
            bt = torch.randperm(nb, generator=gen)[: len(ctx) * mb].view(len(ctx), mb).to(dev)
            q = torch.randn(len(ctx), heads, d, generator=gen).to(dev, dtype)
            rows = torch.arange(len(ctx), device=dev)
            cl = torch.tensor(ctx, device=dev)
            for window in (None, 256):
                ref = torch.zeros_like(q, dtype=torch.float32)
                paged_attention_torch(q.float(), ref, kc.float(), vc.float(), rows, rows, cl, bt, d ** -0.5, window)
                out = torch.zeros_like(q)
                paged_attention_triton(q, out, kc, vc, rows, rows, cl, bt, d ** -0.5, window, max_ctx=max(ctx))
                worst = max(worst, float((out.float() - ref).abs().max()) if dtype != torch.float32 else 0.0)
                tol = 1e-3 if dtype == torch.float32 else 3e-2
                torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    row("kernels", f"paged attention (Triton) vs torch, 3 dtypes x {len(shapes)} shapes x 2 windows", f"equal (16-bit max |diff| {worst:.1e})")
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)):
        for t, k, s, r, din, dout in lora_shapes:
            x = torch.randn(t, din, generator=gen).to(dev, dtype)
            a = (torch.randn(s, r, din, generator=gen) / din ** 0.5).to(dev, dtype)
            b = (torch.randn(s, dout, r, generator=gen) / r ** 0.5).to(dev, dtype)
            slots = torch.randint(0, s, (t, k), generator=gen).to(dev)
            w = torch.rand(t, k, generator=gen).to(dev)
            ref = routed_lora_torch(x.float(), a.float(), b.float(), slots, w, 2.0)
            for plan in (None, plan_from_slots(slots, w, num_slots=s)):
                out = routed_lora(x, a, b, slots, w, 2.0, backend="triton", plan=plan).float()
                err = float((out - ref).norm() / ref.norm())
                assert err < tol, (dtype, t, k, s, err)
    row("kernels", f"routed LoRA (Triton; dynamic and static plans) vs torch, 3 dtypes x {len(lora_shapes)} shapes",
        "equal")


# -- 2. greedy equality with transformers -------------------------------------------------------

def check_greedy(dev: torch.device, root: Path) -> None:
    from transformers import AutoModelForCausalLM

    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine, load_tokenizer
    from server.engine.protocol import GenerationRequest, SamplingParams

    size = "tiny" if dev.type == "cpu" else "1b"
    folder = model_folder(root / "greedy", size, save_weights=True)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(dev).eval()
    gen = torch.Generator().manual_seed(1)
    vocab = SIZES[size]["vocab_size"]
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 37, 128, 300)]
    new = 24
    want = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=dev)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              min_new_tokens=new, pad_token_id=2)
            want.append(out[0, len(p):].tolist())
    del hf
    engine = LLMEngine(EngineConfig(model=folder, device=str(dev), dtype="float32", kv_cache_memory=1 << 30),
                       tokenizer=load_tokenizer(folder))
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    out = engine.generate([GenerationRequest(f"g{i}", p, params) for i, p in enumerate(prompts)])
    got = [[t for e in out[f"g{i}"] for t in e.token_ids] for i in range(len(prompts))]
    same = sum(g == w for g, w in zip(got, want))
    row("greedy", f"{size} random Llama fp32, 4 prompts x {new} tokens vs transformers generate",
        f"{same}/{len(prompts)} equal")
    del engine
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# -- 3. routed-LoRA bandwidth at decode shapes ---------------------------------------------------

def lora_bandwidth(dev: torch.device) -> None:
    from kernels import dynamic_route, plan_from_dense, routed_lora

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n_copy = (1 << 28) if dev.type == "cuda" else (1 << 22)
    src = torch.empty(n_copy, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), dev, 9)
    copy_gbs = 2 * src.numel() * 4 / t_copy / 1e9
    row("bandwidth", "device copy", f"{copy_gbs:.0f} GB/s")
    banks, experts, r = 8, 6, 16
    din, dout = (4096, 14336) if dev.type == "cuda" else (256, 512)
    s = banks * experts
    gen = torch.Generator().manual_seed(2)
    a = (torch.randn(s, r, din, generator=gen) / din ** 0.5).to(dev, dtype)
    b = torch.randn(s, dout, r, generator=gen).to(dev, dtype)
    router = torch.randn(s, din, generator=gen).to(dev) * 2 / din ** 0.5
    cpu = dev.type == "cpu"  # the interpreter: one tiny shape, one run
    for t in (1,) if cpu else (1, 8, 32, 64):
        x = torch.randn(t, din, generator=gen).to(dev, dtype)
        offsets = (torch.arange(t) % banks * experts).to(dev)
        logits = (x.float() @ router.t()).view(t, banks, experts)[torch.arange(t), torch.arange(t) % banks]
        w, _ = dynamic_route(logits)
        plan = plan_from_dense(w, offsets, num_slots=s)
        used = int((plan.seg_len > 0).sum())
        moved = used * (r * din + dout * r) * a.element_size() + t * (din + dout) * 4
        dt = timed(lambda: routed_lora(x, a, b, plan.slots, plan.weights, 2.0, backend="triton", plan=plan), dev, 1 if cpu else 20)
        gbs = moved / dt / 1e9
        row("bandwidth", f"routed LoRA T={t}, {used} expert slots read ({din}->{dout}, r={r}, {dtype})",
            f"{dt * 1e6:.0f} us, {gbs:.0f} GB/s = {gbs / copy_gbs:.0%} of copy")


# -- 4. tokens/s: base, 8 DynMoLE banks, transformers + PEFT ------------------------------------

def dynmole_banks(fp, n: int, dev, r: int = 16, experts: int = 6):
    from benchmarks.banks import dynmole_bank

    return [dynmole_bank(fp, f"bank{k}", 100 + k, experts, r, device=dev) for k in range(n)]


def throughput(dev: torch.device, root: Path, size: str, seqs: int, tokens: int, prompt: int, peer: bool) -> None:
    from adapters import BaseFingerprint
    from adapters.runtime import BankRegistry
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine, load_tokenizer
    from server.engine.protocol import GenerationRequest, SamplingParams

    folder = model_folder(root / "tput", size)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = random_model(folder, dev, dtype)
    vocab = SIZES[size]["vocab_size"]
    engine = LLMEngine(EngineConfig(model=folder, device=str(dev), dtype="bfloat16" if dev.type == "cuda" else "float32",
                                    kv_cache_memory=0.5 if dev.type == "cuda" else 64 << 20, max_num_seqs=seqs,
                                    max_num_batched_tokens=max(2048, seqs)),
                       model=model, tokenizer=load_tokenizer(folder))
    fp = BaseFingerprint.from_hf_config(json.loads((folder / "config.json").read_text()))
    registry = BankRegistry(model.config, device=dev, dtype=dtype)
    banks = dynmole_banks(fp, 8, dev)
    for bank in banks:
        registry.add(bank)
    engine.set_adapter_provider(registry)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (prompt,), generator=gen).tolist() for _ in range(seqs)]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    def run(with_banks: bool) -> float:
        reqs = [GenerationRequest(f"{with_banks}{i}", p, params, bank=banks[i % 8].name if with_banks else None)
                for i, p in enumerate(prompts)]
        sync(dev)
        t0 = time.perf_counter()
        out = engine.generate(reqs)
        sync(dev)
        return sum(len(e.token_ids) for evs in out.values() for e in evs) / (time.perf_counter() - t0)

    run(False), run(True)  # warm-up (Triton compiles)
    base, banked = [], []
    for _ in range(2):  # alternating
        base.append(run(False))
        banked.append(run(True))
    b, k = max(base), max(banked)
    row("tokens/s", f"{size}: base model, {seqs} seqs x {tokens} tokens (engine in-process, {dtype})", f"{b:.0f}")
    row("tokens/s", f"{size}: 8 DynMoLE banks (6 experts, r=16, gate/up/down)", f"{k:.0f} = {k / b:.2f}x base (goal >= 0.9x)")
    engine = registry = model = None  # free the device memory before the peer loads  # noqa: F841
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if not peer:
        return
    try:
        import peft
    except ImportError:
        row("tokens/s", f"{size}: transformers + PEFT, one LoRA", "not measured: peft not installed (carry its wheel)")
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device(dev):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"], init_lora_weights=False)
    hf = peft.get_peft_model(hf, lora).eval()
    ids = torch.tensor(prompts, device=dev)

    def run_peer() -> float:
        sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False, pad_token_id=2)
        sync(dev)
        return (out.shape[1] - prompt) * out.shape[0] / (time.perf_counter() - t0)

    run_peer()
    p = max(run_peer() for _ in range(2))
    row("tokens/s", f"{size}: transformers + PEFT, one LoRA on all linears (batched generate)",
        f"{p:.0f}; moleserve with 8 DynMoLE banks = {k / p:.2f}x it")


# -- 5. decode: CUDA graphs vs eager -------------------------------------------------------------

def graphs_vs_eager(dev: torch.device, root: Path, size: str, tokens: int) -> None:
    """Decode tok/s of the base model with every decode step eager vs through ``DecodeGraphRunner``
    (one engine; the runner switched on and off between alternating runs), at batch 1, 8 and 32.
    Off CUDA nothing is captured: the graph runner's static-buffer path runs eagerly (the dry run)."""
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine, load_tokenizer
    from server.engine.protocol import GenerationRequest, SamplingParams

    cuda = dev.type == "cuda"
    folder = model_folder(root / "graphs", size)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = random_model(folder, dev, dtype)
    engine = LLMEngine(EngineConfig(model=folder, device=str(dev), dtype="bfloat16" if cuda else "float32",
                                    kv_cache_memory=0.3 if cuda else 32 << 20, max_num_seqs=32, enforce_eager=True),
                       model=model, tokenizer=load_tokenizer(folder))
    graphs = engine.runner.enable_graphs(32, engine.max_model_len, capture=cuda)
    row("graphs", f"{size}: capture of decode batch sizes {graphs.batch_sizes} (one shared pool)",
        f"{graphs.capture_seconds:.2f} s" if cuda else "not captured off CUDA: the static-buffer path runs eagerly")
    replays = [0]
    run_graph = graphs.run

    def counted(*args):
        replays[0] += 1
        return run_graph(*args)

    graphs.run = counted
    vocab = SIZES[size]["vocab_size"]
    gen = torch.Generator().manual_seed(4)
    new = tokens if cuda else 8
    for batch in (1, 8, 32) if cuda else (1, 3):
        prompts = [torch.randint(3, vocab, (16,), generator=gen).tolist() for _ in range(batch)]
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)

        def run(use: bool) -> tuple[float, list[list[int]]]:
            engine.runner.graphs = graphs if use else None
            reqs = [GenerationRequest(f"{use}{i}", p, params) for i, p in enumerate(prompts)]
            sync(dev)
            t0 = time.perf_counter()
            out = engine.generate(reqs)
            sync(dev)
            dt = time.perf_counter() - t0
            got = [[t for e in out[r.request_id] for t in e.token_ids] for r in reqs]
            return sum(map(len, got)) / dt, got

        _, eager_tokens = run(False)
        before = replays[0]
        _, graph_tokens = run(True)
        if replays[0] == before:
            raise SystemExit("graphs: no decode step went through the graph runner")
        same = sum(a == b for a, b in zip(eager_tokens, graph_tokens))
        eager, graphed = [], []
        for _ in range(2 if cuda else 1):  # alternating
            eager.append(run(False)[0])
            graphed.append(run(True)[0])
        e, g = max(eager), max(graphed)
        row("graphs", f"{size}: decode batch {batch} x {new} tokens (prompt 16), eager vs graph runner, {dtype}",
            f"{e:.0f} vs {g:.0f} tok/s = {g / e:.2f}x; greedy tokens equal in {same}/{batch}")
    engine.runner.graphs = None
    engine = graphs = model = None  # noqa: F841 - free the device memory
    if cuda:
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="1b,8b")
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--sections", default="kernels,greedy,bandwidth,graphs,tokens")
    args = ap.parse_args()
    dev = torch.device(args.device)
    # Triton reads this when its kernels are first decorated (their modules are imported lazily)
    os.environ["TRITON_INTERPRET"] = "1" if dev.type == "cpu" else "0"
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        row("device", "GPU", f"{name}, torch {torch.__version__}")
    sections = set(args.sections.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "kernels" in sections:
            check_kernels(dev)
        if "greedy" in sections:
            check_greedy(dev, root)
        if "bandwidth" in sections:
            lora_bandwidth(dev)
        if "graphs" in sections:
            graphs_vs_eager(dev, root, args.sizes.split(",")[0], min(args.tokens, 64))  # the smallest: launch-bound
        if "tokens" in sections:
            for size in args.sizes.split(","):
                throughput(dev, root, size, args.seqs, args.tokens, args.prompt, not args.skip_peer)
    print("\n| section | what | result |\n| --- | --- | --- |")
    for sec, what, res in ROWS:
        print(f"| {sec} | {what} | {res} |")


if __name__ == "__main__":
    main()
