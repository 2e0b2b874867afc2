"""The training loop: data -> micro-batches -> BankObjective -> AdamW, with gradient accumulation,
checkpoints and resume, DDP (under ``torchrun``), a progress bar, and the bank written at the end.

Batching is defined so that a run's result does not depend on how it is spread over processes:
optimizer step s takes the examples [s*B, (s+1)*B) of its epoch's seeded order, cut into
micro-batches of M consecutive examples; micro-batch j goes to rank j % world; each micro-batch's
dropout uses a generator seeded by (seed, s, j); the step's gradient is the mean over its B/M
micro-batches of each micro-batch's loss (mean LM loss over its target tokens + aux losses).
A trailing partial batch of an epoch is dropped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .config import TrainConfig
from .data import Example, epoch_order, load_examples
from .modules import TrainableBank
from .objective import BankObjective, FlatBatch

CHECKPOINT = "checkpoint.pt"
HISTORY = "training.json"
PLOT = "curves.png"


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float  # wall time of the optimisation steps run by this call
    tokens: int  # tokens processed by this call (all ranks)
    trainable_params: int
    history: list[dict] = field(default_factory=list)
    is_main: bool = True  # rank 0 (the process that wrote the bank)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group when started by ``torchrun`` (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world <= 1:
        return Dist(device=device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def _micro_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step) * 4099 + micro


def train(config: TrainConfig, *, tokenizer=None, model=None, examples: list[Example] | None = None) -> TrainResult:
    """Train a bank as ``config`` says and write it to ``config.out``. ``tokenizer``/``model``/
    ``examples`` may be passed in (tests, the first-run bank) to skip loading them again."""
    cfg = config.resolved()
    if cfg.kind == "parrot":  # projector + visual mixture on a frozen LLM and tower: its own loop
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("kind parrot trains in one process (no torchrun)")
        from adapters.parrot.train import train_parrot

        return train_parrot(cfg, tokenizer=tokenizer, model=model)
    env = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif env.world > 1 and env.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", env.world))))
    out = Path(cfg.out)

    if model is None or tokenizer is None:
        from transformers import AutoTokenizer

        from server.commands.common import resolve_model_path
        from server.model import load_model

        path = resolve_model_path(cfg.model)
        model = model or load_model(path, device=env.device)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    if examples is None:
        examples = load_examples(cfg.data, tokenizer, cutoff=cfg.cutoff, limit=cfg.limit, seed=cfg.seed)

    from adapters.fingerprint import BaseFingerprint

    base = BaseFingerprint.from_hf_config(model.config.raw)
    torch.manual_seed(cfg.seed)
    bank = TrainableBank(base, cfg.bank_spec()).to(env.device)
    objective = BankObjective(model, bank, dropout=cfg.dropout, entropy_coef=cfg.entropy_coef,
                              balance_coef=cfg.balance_coef).train()
    wrapped = objective
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # A mixlora expert that no token of a micro-batch picked gets no gradient in that step.
        wrapped = DistributedDataParallel(objective, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                          find_unused_parameters=cfg.kind == "mixlora")
    optimizer = torch.optim.AdamW(bank.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    n_micro = cfg.batch_size // cfg.micro_batch_size
    if n_micro % env.world:
        raise ValueError(f"batch_size/micro_batch_size = {n_micro} micro-batches per step must be a multiple of "
                         f"the {env.world} processes")
    if len(examples) < cfg.batch_size and env.world > 1:
        raise ValueError(f"{len(examples)} examples cannot fill one batch of {cfg.batch_size} across {env.world} processes")
    steps_per_epoch = max(1, len(examples) // cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps is not None else max(1, math.floor(cfg.epochs * steps_per_epoch))

    start_step, history = 0, []
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=env.device, weights_only=True)
        if state.get("config_key") != _config_key(cfg):
            raise ValueError(f"{ckpt} was written by a different configuration; use another --out or delete it")
        bank.load_state_dict(state["bank"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, history = int(state["step"]), list(state["history"])

    bar = None
    if cfg.progress and env.is_main and start_step < total_steps:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=f"train {cfg.kind}", dynamic_ncols=True)
    t0, tokens_run = time.perf_counter(), 0
    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        order = epoch_order(len(examples), epoch, cfg.seed)
        chunk = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
        micros = [chunk[j:j + cfg.micro_batch_size] for j in range(0, len(chunk), cfg.micro_batch_size)]
        mine = list(range(env.rank, len(micros), env.world))
        step_t0 = time.perf_counter()
        sums = torch.zeros(5 + bank.spec.num_experts, dtype=torch.float64)
        optimizer.zero_grad(set_to_none=True)
        for pos, j in enumerate(mine):
            batch = FlatBatch.of([examples[i] for i in micros[j]], env.device)
            sync = pos == len(mine) - 1 or env.world == 1
            no_sync = wrapped.no_sync() if not sync else contextlib.nullcontext()
            with no_sync, torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
                torch.manual_seed(_micro_seed(cfg.seed, step, j))
                res = wrapped(batch)
                (res.loss * (env.world / len(micros))).backward()
            load = res.load + [0.0] * (bank.spec.num_experts - len(res.load))
            sums += torch.tensor([float(res.loss.detach()), res.lm, res.entropy, res.broadcast, res.tokens, *load],
                                 dtype=torch.float64)
        optimizer.step()
        if env.world > 1:
            dist.all_reduce(sums)
        tokens_run += int(sums[4])
        means = sums / len(micros)
        record = {"step": step + 1, "loss": means[0].item(), "lm": means[1].item(), "entropy": means[2].item(),
                  "broadcast": means[3].item(), "tokens": int(sums[4]), "seconds": time.perf_counter() - step_t0,
                  "load": [round(v, 5) for v in means[5:].tolist()]}
        history.append(record)
        if bar is not None:
            bar.update(1)
            postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{tokens_run / (time.perf_counter() - t0):.0f}"}
            if cfg.kind == "dynmole":
                postfix.update(ent=f"{record['entropy']:.3f}", bcast=f"{record['broadcast']:.2f}")
            bar.set_postfix(postfix)
        out_of_time = cfg.max_seconds is not None and time.perf_counter() - t0 >= cfg.max_seconds
        if env.world > 1 and cfg.max_seconds is not None:  # every rank must stop at the same step
            flag = torch.tensor([float(out_of_time)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        done = step + 1 == total_steps or out_of_time
        if done or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            _save_checkpoint(env, ckpt, bank, optimizer, step + 1, history, cfg)
        if done:
            break
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    result = TrainResult(out=out, steps=len(history), seconds=seconds, tokens=tokens_run,
                         trainable_params=bank.num_trainable(), history=history, is_main=env.is_main)
    if env.is_main:
        bank.to_bank(cfg.name or _bank_name(out)).save(out)
        summary = {"config": cfg.to_dict(), "trainable_params": result.trainable_params, "examples": len(examples),
                   "steps": len(history), "seconds_this_run": seconds, "tokens_this_run": tokens_run,
                   "tokens_per_s": result.tokens_per_s, "world_size": env.world, "history": history}
        (out / HISTORY).write_text(json.dumps(summary, indent=1) + "\n")
        from .plot import plot_curves

        plot_curves(history, out / PLOT, title=f"{cfg.kind} (N={cfg.experts}, r={cfg.rank})")
    if env.world > 1:
        dist.barrier()
    return result


def _config_key(cfg: TrainConfig) -> str:
    """What must match for a checkpoint to be resumed (not the step budget, logging or threads)."""
    d = cfg.to_dict()
    for key in ("max_steps", "max_seconds", "epochs", "save_every", "threads", "progress", "out", "name"):
        d.pop(key)
    return json.dumps(d, sort_keys=True)


def _save_checkpoint(env: Dist, path: Path, bank: TrainableBank, optimizer, step: int, history: list, cfg) -> None:
    if not env.is_main:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "bank": bank.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
             "config_key": _config_key(cfg)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _bank_name(out: Path) -> str:
    import re

    name = re.sub(r"[^A-Za-z0-9._-]", "-", out.resolve().name).lstrip("._-")
    return name[:128] or "bank"
