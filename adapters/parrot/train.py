"""``moleserve train --kind parrot``: train a ``parrot`` bank (projector + visual mixture) on a frozen
LLM and a frozen vision tower, from LLaVA-format image-text data (ALGORITHMS.md §5).

Stage 1 trains the projector alone (the mixture bypassed); stage 2 the projector and the mixture.
The LLM and the tower stay frozen (the release also tunes the LLM in stage 2; a bank cannot carry
an LLM, so here it does not). The tower runs once per distinct image before the first step (its
features do not change); each step then projects, mixes (dense routing, as released, on the
word embeddings of the prompt's text tokens: the text the serving-time mixture sees), writes the
visual embeddings at the image's placeholder rows and takes the LM loss on the answer tokens.

A fresh mixture starts with its experts' ``down_proj`` at zero, so with ``moe_weight`` 1 stage 2
starts exactly where the projector (``--init`` a stage-1 bank) left off, as LoRA's B = 0 does.
The loop keeps the other kinds' conventions: optimizer step s takes examples [s*B, (s+1)*B) of its
epoch's seeded order, a progress bar, ``checkpoint.pt`` (resumed), ``training.json``, ``curves.png``.
One process (no DDP).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor

from adapters.fingerprint import BaseFingerprint
from adapters.train.config import ConfigError, TrainConfig
from adapters.train.data import DataError, epoch_order
from adapters.train.losses import lm_loss
from adapters.train.objective import FlatBatch

from .bank import build_parrot_bank, visual_adapter
from .config import ParrotConfig, ParrotConfigError, VisualRouting
from .data import ImageExample, load_image_examples
from .modules import VisualAdapter


def parrot_config(cfg: TrainConfig, hidden_size: int, tower) -> ParrotConfig:
    """The adapter the run trains: the tower's width and feature selection, the run's mixture."""
    raw = {"mm_hidden_size": tower.hidden_size, "mm_projector_type": cfg.projector_type,
           "mm_vision_select_layer": tower.select_layer, "mm_vision_select_feature": tower.select_feature,
           "image_aspect_ratio": "pad", "moe_weight": cfg.moe_weight, "use_moe": cfg.stage == 2}
    if cfg.stage == 2:
        raw.update(moe_hidden_size=hidden_size, num_experts=cfg.experts,
                   moe_intermediate_size=cfg.moe_intermediate_size or hidden_size)
    try:
        return ParrotConfig.from_dict(raw, hidden_size=hidden_size, where="parrot training")
    except ParrotConfigError as exc:
        raise ConfigError(str(exc)) from None


def initial_adapter(pcfg: ParrotConfig, init: str | None, base: BaseFingerprint) -> VisualAdapter:
    """A fresh adapter (experts' down_proj zero), or one started from the bank ``init``: its
    projector, and its mixture when the shapes agree."""
    adapter = VisualAdapter(pcfg)
    if adapter.moe_model is not None:
        with torch.no_grad():
            for expert in adapter.moe_model.experts:
                expert.down_proj.weight.zero_()
    if init is None:
        return adapter
    from adapters import BankError, load_bank

    try:
        bank = load_bank(init, base=base)
        source = visual_adapter(bank)
    except BankError as exc:
        raise ConfigError(f"--init {init}: {exc}") from None
    if source.config.mm_hidden_size != pcfg.mm_hidden_size or source.config.projector_type != pcfg.projector_type:
        raise ConfigError(f"--init {init}: its projector ({source.config.projector_type}, mm_hidden_size "
                          f"{source.config.mm_hidden_size}) is not this run's ({pcfg.projector_type}, {pcfg.mm_hidden_size})")
    adapter.mm_projector.load_state_dict(source.mm_projector.state_dict())
    if adapter.moe_model is not None and source.moe_model is not None:
        try:
            adapter.moe_model.load_state_dict(source.moe_model.state_dict())
        except RuntimeError:
            raise ConfigError(f"--init {init}: its mixture has other sizes than this run's") from None
    return adapter


@torch.no_grad()
def encode_images(paths: list[Path], tower, processor, *, batch: int = 16, progress: bool = True) -> dict[Path, Tensor]:
    """Tower features of every distinct image, fp32 on the CPU: path -> [N, mm_hidden]."""
    from PIL import Image

    todo = list(dict.fromkeys(paths))
    out: dict[Path, Tensor] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="encode images", dynamic_ncols=True)
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        pixels = []
        for path in chunk:
            try:
                with Image.open(path) as img:
                    pixels.append(processor(img.convert("RGB")))
            except OSError as exc:
                raise DataError(f"image {str(path)!r}: cannot be decoded ({exc})") from None
        feats = tower.features(torch.stack(pixels)).float().cpu()
        out.update(zip(chunk, feats))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


class ParrotObjective:
    """One micro-batch: project (and mix) each example's image features, feed them at the image's
    rows of the frozen LLM, LM loss on the answer tokens. Returns (loss, stats)."""

    def __init__(self, model, adapter: VisualAdapter, features: dict[Path, Tensor]):
        self.model, self.adapter, self.features = model, adapter, features
        self.device = model.device

    def __call__(self, examples: list[ImageExample]) -> tuple[Tensor, dict]:
        from server.model import SequenceKVCache, StepContext, step_context

        batch = FlatBatch.of(examples, self.device)
        feats = torch.stack([self.features[ex.image] for ex in examples]).to(self.device, torch.float32)
        projected = list(self.adapter.project(feats))  # B x [N, D]
        ids = batch.input_ids
        starts = [0]
        for n in batch.seq_lens[:-1]:
            starts.append(starts[-1] + n)
        text = [self.model.embed_tokens(ids[s + torch.tensor(ex.text_rows(), dtype=torch.long, device=self.device)]).float()
                for s, ex in zip(starts, examples)]
        visual, routes = self.adapter.mix(projected, text, VisualRouting())
        rows = torch.cat([torch.arange(s + ex.offset, s + ex.offset + ex.length, device=self.device)
                          for s, ex in zip(starts, examples)])
        cache = SequenceKVCache(self.model.config)
        attention = cache.step(list(range(len(examples))), batch.seq_lens)
        ctx = StepContext(positions=batch.positions, attention=attention, logits_indices=batch.predict_rows,
                          input_embeds=(rows, torch.cat(visual)))
        with step_context(ctx):
            logits = self.model(ids)
        loss = lm_loss(logits, batch.targets)
        stats = {"entropy": 0.0, "load": []}
        if routes and routes[0] is not None:
            stats["entropy"] = sum(r.entropy for r in routes) / len(routes)
            stats["load"] = torch.stack([r.probs.detach() for r in routes]).mean(0).tolist()
        stats["tokens"] = int(ids.numel())
        return loss, stats


def train_parrot(cfg: TrainConfig, *, tokenizer=None, model=None, tower=None, processor=None):
    """Train as ``cfg`` says (``cfg.kind == 'parrot'``, resolved) and write the bank to ``cfg.out``.
    ``tokenizer``/``model``/``tower``/``processor`` may be passed in (tests) to skip loading them."""
    from adapters.train.trainer import CHECKPOINT, HISTORY, PLOT, TrainResult, _bank_name, _config_key

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if model is None or tokenizer is None:
        from transformers import AutoTokenizer

        from server.commands.common import resolve_model_path
        from server.model import load_model

        path = resolve_model_path(cfg.model)
        model = model or load_model(path, device=device)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    model.requires_grad_(False)
    device = model.device
    if tower is None or processor is None:
        from server.model.errors import ModelLoadError
        from server.model.vision import load_vision_tower
        from server.multimodal.image_processor import ImageProcessor, ImageProcessorError

        try:
            tower = tower or load_vision_tower(cfg.vision_tower, select_layer=cfg.select_layer,
                                               select_feature=cfg.select_feature, device=device)
            processor = processor or ImageProcessor.from_folder(cfg.vision_tower, aspect="pad")
        except (ModelLoadError, ImageProcessorError) as exc:
            raise ConfigError(f"--vision-tower {cfg.vision_tower}: {exc}") from None
    placeholder = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    examples = load_image_examples(cfg.data, tokenizer, tokens_per_image=tower.num_tokens, placeholder_id=placeholder,
                                   cutoff=cfg.cutoff, image_folder=cfg.image_folder, limit=cfg.limit, seed=cfg.seed)
    features = encode_images([ex.image for ex in examples], tower, processor, progress=cfg.progress)

    base = BaseFingerprint.from_hf_config(model.config.raw)
    pcfg = parrot_config(cfg, base.hidden_size, tower)
    torch.manual_seed(cfg.seed)
    adapter = initial_adapter(pcfg, cfg.init, base).to(device=device, dtype=torch.float32).train()
    objective = ParrotObjective(model, adapter, features)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps_per_epoch = max(1, len(examples) // cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps is not None else max(1, int(cfg.epochs * steps_per_epoch))
    start_step, history = 0, []
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state.get("config_key") != _config_key(cfg):
            raise ValueError(f"{ckpt} was written by a different configuration; use another --out or delete it")
        adapter.load_state_dict(state["bank"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, history = int(state["step"]), list(state["history"])

    bar = None
    if cfg.progress and start_step < total_steps:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=f"train parrot (stage {cfg.stage})", dynamic_ncols=True)
    n_micro = cfg.batch_size // cfg.micro_batch_size
    t0, tokens_run = time.perf_counter(), 0
    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        chunk = epoch_order(len(examples), epoch, cfg.seed)[index * cfg.batch_size:(index + 1) * cfg.batch_size]
        step_t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, entropy_sum, load_sum, tokens = 0.0, 0.0, torch.zeros(max(pcfg.num_experts, 1), dtype=torch.float64), 0
        for j in range(0, len(chunk), cfg.micro_batch_size):
            loss, stats = objective([examples[i] for i in chunk[j:j + cfg.micro_batch_size]])
            (loss / n_micro).backward()
            loss_sum += float(loss.detach())
            entropy_sum += stats["entropy"]
            if stats["load"]:
                load_sum += torch.tensor(stats["load"], dtype=torch.float64)
            tokens += stats["tokens"]
        optimizer.step()
        tokens_run += tokens
        mean_loss = loss_sum / n_micro
        record = {"step": step + 1, "loss": mean_loss, "lm": mean_loss, "entropy": entropy_sum / n_micro,
                  "broadcast": 0.0, "tokens": tokens, "seconds": time.perf_counter() - step_t0,
                  "load": [round(v, 5) for v in (load_sum / n_micro).tolist()] if pcfg.has_mixture else []}
        history.append(record)
        if bar is not None:
            bar.update(1)
            postfix = {"loss": f"{mean_loss:.3f}", "tok/s": f"{tokens_run / (time.perf_counter() - t0):.0f}"}
            if pcfg.has_mixture:
                postfix["ent"] = f"{record['entropy']:.3f}"
            bar.set_postfix(postfix)
        out_of_time = cfg.max_seconds is not None and time.perf_counter() - t0 >= cfg.max_seconds
        done = step + 1 == total_steps or out_of_time
        if done or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            _save_checkpoint(ckpt, adapter, optimizer, step + 1, history, _config_key(cfg))
        if done:
            break
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    trainable = sum(p.numel() for p in adapter.parameters())
    result = TrainResult(out=out, steps=len(history), seconds=seconds, tokens=tokens_run, trainable_params=trainable,
                         history=history)
    build_parrot_bank(cfg.name or _bank_name(out), base, adapter, tokens_per_image=tower.num_tokens).save(out)
    summary = {"config": cfg.to_dict(), "trainable_params": trainable, "examples": len(examples),
               "images": len(features), "tokens_per_image": tower.num_tokens, "steps": len(history),
               "seconds_this_run": seconds, "tokens_this_run": tokens_run, "tokens_per_s": result.tokens_per_s,
               "world_size": 1, "history": history}
    (out / HISTORY).write_text(json.dumps(summary, indent=1) + "\n")
    from adapters.train.plot import plot_curves

    title = f"parrot stage {cfg.stage}" + (f" (E={pcfg.num_experts}, I={pcfg.moe_intermediate_size})" if pcfg.has_mixture else "")
    plot_curves(history, out / PLOT, title=title)
    return result


def _save_checkpoint(path: Path, adapter: VisualAdapter, optimizer, step: int, history: list, key: str) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "bank": adapter.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
             "config_key": key}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
