"""Building a factor bank: neuron permutation, then routers trained with the Prior-Approximate loss.

ALGORITHMS.md §4, avoiding the release's pitfalls: (a) the router is trained through a loss with a
gradient (a KL towards the PA pseudo-label, not through the hard top-k mask); (b) each layer's
labels come from that layer's *own* FFN input and dense FFN output, captured inside the dense
model's forward on calibration text; (c) serving dispatches only the chosen experts
(adapters/factor/serving.py).

Per calibration step (one flat batch of text through the dense model), for every layer with FFN
input x [N, H] and dense output y = FFN(x):

    d_j   = mean_c (expert_j(x) - y / (E/k))^2                 for j = 1..E
    label = multi-hot of the k smallest d_j
    loss  = kl_weight * KL(softmax(label) || softmax(router x))   (F.kl_div, batch mean)
          + balance_weight * mean(topk_mask(router x) * softmax(router x))

and one Adam step on all routers. Several configurations (E, K) can calibrate from the same
forward passes (the benchmark does), since labels depend only on x, y and each config's experts.

The output scale s of each layer (FFN = s * sum of the chosen experts): ``fit`` = least squares
of s * sum_S expert(x) against y over the second half of the steps (S = the router's choice);
``release`` = E/k; ``none`` = 1. K = E always gets 1 (the dense FFN exactly).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from server.model import SequenceKVCache, StepContext, step_context

from ..bank import ExpertBank
from ..fingerprint import BaseFingerprint
from .bank import build_factor_bank
from .kernel import expert_outputs, pack_experts
from .permutation import METHODS, choose_permutation

RESCALE = ("fit", "release", "none")


@dataclass(frozen=True)
class FactorConfig:
    """One factorisation: E experts, top-k, and how to calibrate. Defaults are the CLI's."""

    experts: int
    top_k: int
    permutation: str = "coact"  # one of permutation.METHODS
    rescale: str = "fit"  # one of RESCALE
    lr: float = 5e-3
    kl_weight: float = 0.05
    balance_weight: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.experts < 1 or not 1 <= self.top_k <= self.experts:
            raise ValueError(f"need 1 <= top_k <= experts, got experts={self.experts}, top_k={self.top_k}")
        if self.permutation not in METHODS:
            raise ValueError(f"permutation must be one of {METHODS}, got {self.permutation!r}")
        if self.rescale not in RESCALE:
            raise ValueError(f"rescale must be one of {RESCALE}, got {self.rescale!r}")


@dataclass
class CalibrationReport:
    """What calibration did and how well the routers fit (per step: mean over layers)."""

    config: dict
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    pa_loss: list[float] = field(default_factory=list)  # the router objective
    label_agreement: list[float] = field(default_factory=list)  # |router top-k ∩ PA label| / k
    relative_error: list[float] = field(default_factory=list)  # ||s sum_S expert - y||^2 / ||y||^2
    scales: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        def ends(v: list[float]) -> list[float]:
            return [round(v[0], 5), round(v[-1], 5)] if v else []

        return {"config": self.config, "steps": self.steps, "tokens": self.tokens, "minutes": round(self.seconds / 60, 2),
                "pa_loss_first_last": ends(self.pa_loss), "label_agreement_first_last": ends(self.label_agreement),
                "relative_error_first_last": ends(self.relative_error),
                "scale_mean": round(sum(self.scales) / len(self.scales), 4) if self.scales else None}


# -- calibration text ---------------------------------------------------------------------------

def calibration_sequences(tokenizer, paths: list[str | Path], seq_len: int, *, seed: int = 0,
                          max_tokens: int | None = None) -> list[list[int]]:
    """Token sequences of length ``seq_len`` cut from the text of ``paths``, shuffled (seeded).

    A ``.json`` (list) / ``.jsonl`` file of records contributes each record's instruction, input
    and output (LLM-Adapters) or its ``text`` field; any other file is plain text. Documents are
    joined with EOS.
    """
    docs: list[str] = []
    for path in paths:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".json", ".jsonl"):
            records = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
            docs += [str(r["text"]) if "text" in r else
                     "\n\n".join(str(r[k]) for k in ("instruction", "input", "output") if r.get(k))
                     for r in records if isinstance(r, dict)]
        else:
            docs.append(text)
    random.Random(seed).shuffle(docs)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    budget = max_tokens if max_tokens is not None else float("inf")
    for doc in docs:
        stream += tokenizer(doc)["input_ids"] + ([eos] if eos is not None else [])
        if len(stream) >= budget:
            break
    seqs = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not seqs:
        raise ValueError(f"calibration text holds fewer than {seq_len} tokens")
    return seqs


# -- capturing each layer's FFN input and output --------------------------------------------------

class _CaptureStep:
    """AdapterStep that runs the dense FFN and hands (layer, x, FFN(x)) to ``observe``."""

    def __init__(self, observe: Callable[[int, Tensor, Tensor], None]):
        self.observe = observe

    def linear(self, layer, targets, x, out) -> None:
        pass

    def mlp(self, layer: int, x: Tensor, mlp) -> Tensor:
        y = mlp.dense(x)
        self.observe(layer, x, y)
        return y


@torch.no_grad()
def run_captured(model, seqs: list[list[int]], observe: Callable[[int, Tensor, Tensor], None]) -> int:
    """One dense forward over ``seqs`` (a flat batch), calling observe(layer, x [N, H], y [N, H])
    at every FFN. Returns N. The LM head runs for one row only (its logits are not needed)."""
    cache = SequenceKVCache(model.config)
    ids = list(range(len(seqs)))
    step = cache.step(ids, [len(s) for s in seqs])
    tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=model.device)
    ctx = StepContext(positions=step.positions().to(model.device), attention=step, adapters=_CaptureStep(observe),
                      logits_indices=torch.zeros(1, dtype=torch.long, device=model.device))
    with step_context(ctx):
        model(tokens)
    return tokens.numel()


# -- router training -------------------------------------------------------------------------------

class RouterCalibration:
    """Trains the routers of one FactorConfig from observed (layer, x, y)."""

    def __init__(self, model, cfg: FactorConfig, permutations: list[Tensor], total_steps: int):
        self.cfg = cfg
        self.total_steps = total_steps
        self.permutations = permutations
        self.experts = []
        for block, perm in zip(model.layers, permutations):
            mlp = block.mlp
            w1, w2, b = pack_experts(mlp.gate_up_proj.weight.float(), mlp.down_proj.weight.float(), perm,
                                     cfg.experts, None if mlp.gate_up_proj.bias is None else mlp.gate_up_proj.bias.float())
            self.experts.append((w1, w2, b, None if mlp.down_proj.bias is None else mlp.down_proj.bias.float()))
        layers, hidden = len(model.layers), model.config.hidden_size
        gen = torch.Generator().manual_seed(cfg.seed)
        self.routers = torch.nn.Parameter(torch.randn(layers, cfg.experts, hidden, generator=gen) * 0.02)
        self.optimizer = torch.optim.Adam([self.routers], lr=cfg.lr)
        self.fit_num = torch.zeros(layers, dtype=torch.float64)
        self.fit_den = torch.zeros(layers, dtype=torch.float64)
        self.report = CalibrationReport(config=asdict(cfg))
        self._stats: list[tuple[float, float, float]] = []
        self.step_index = 0

    def observe(self, layer: int, x: Tensor, y: Tensor) -> None:
        cfg = self.cfg
        e, k = cfg.experts, cfg.top_k
        w1, w2, b1, b2 = self.experts[layer]
        x, y = x.float(), y.float()
        outs = expert_outputs(x, w1, w2, b1)  # [N, E, H]; the down bias is outside every expert
        d = (outs - (y if b2 is None else y - b2).unsqueeze(1) * (k / e)).pow(2).mean(-1)  # [N, E]
        label = torch.zeros_like(d).scatter_(1, torch.topk(d, k, dim=1, largest=False).indices, 1.0)
        with torch.enable_grad():
            logits = F.linear(x, self.routers[layer])
            probs = torch.softmax(logits, dim=-1)
            chosen = torch.topk(logits.detach(), k, dim=1).indices
            mask = torch.zeros_like(d).scatter_(1, chosen, 1.0)
            kl = F.kl_div(torch.log_softmax(logits, dim=-1), torch.softmax(label, dim=-1), reduction="batchmean")
            loss = cfg.kl_weight * kl + cfg.balance_weight * (mask * probs).mean()
            loss.backward()
        # How the current routing approximates the dense FFN, and the least-squares scale.
        target = y if b2 is None else y - b2
        approx = (outs * mask.unsqueeze(-1)).sum(1)
        if self.step_index >= self.total_steps // 2:
            self.fit_num[layer] += float((approx * target).sum())
            self.fit_den[layer] += float((approx * approx).sum())
        scale = e / k if cfg.rescale == "release" else 1.0
        rel = float((scale * approx - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))
        self._stats.append((float(loss), float((mask * label).sum(1).mean() / k), rel))

    def step(self, tokens: int) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(self._stats)
        for values, stat in zip(zip(*self._stats), ("pa_loss", "label_agreement", "relative_error")):
            getattr(self.report, stat).append(sum(values) / n)
        self._stats.clear()
        self.step_index += 1
        self.report.steps += 1
        self.report.tokens += tokens

    def scales(self) -> list[float]:
        cfg = self.cfg
        if cfg.top_k == cfg.experts or cfg.rescale == "none":
            return [1.0] * len(self.experts)
        if cfg.rescale == "release":
            return [cfg.experts / cfg.top_k] * len(self.experts)
        fitted = self.fit_num / self.fit_den.clamp_min(1e-12)
        return [float(s) if s > 0 else 1.0 for s in fitted.clamp(max=cfg.experts / cfg.top_k).tolist()]

    def bank(self, name: str, base: BaseFingerprint) -> ExpertBank:
        scales = self.scales()
        self.report.scales = scales
        return build_factor_bank(name, base, top_k=self.cfg.top_k, routers=list(self.routers.detach()),
                                 permutations=self.permutations, scales=scales)


def factorize(model, base: BaseFingerprint, sequences: list[list[int]], configs: list[FactorConfig], *,
              steps: int, seqs_per_step: int, names: list[str] | None = None,
              log: Callable[[str], None] = lambda s: None) -> list[tuple[ExpertBank, CalibrationReport]]:
    """Factorise ``model``'s FFNs for each config, calibrating from the same ``steps`` batches of
    ``seqs_per_step`` sequences (cycled if ``sequences`` runs out). The first batch also gives the
    co-activation features. Returns one (validated bank, report) per config."""
    if not sequences:
        raise ValueError("no calibration sequences")
    start = time.perf_counter()
    batches = [[sequences[(s * seqs_per_step + j) % len(sequences)] for j in range(seqs_per_step)] for s in range(steps)]

    first_x: dict[int, Tensor] = {}
    if any(c.permutation == "coact" for c in configs):
        run_captured(model, batches[0], lambda layer, x, y: first_x.__setitem__(layer, x.float()))
    perms: dict[tuple[str, int, int], list[Tensor]] = {}
    calibrations = []
    for cfg in configs:
        key = (cfg.permutation, cfg.experts, cfg.seed)
        if key not in perms:
            perms[key] = [choose_permutation(cfg.permutation, cfg.experts, block.mlp.gate_up_proj.weight.detach().cpu(),
                                             first_x.get(i), seed=cfg.seed).to(model.device)
                          for i, block in enumerate(model.layers)]
            log(f"permutation {key[0]} E={key[1]}: {time.perf_counter() - start:.1f}s")
        calibrations.append(RouterCalibration(model, cfg, perms[key], steps))
    first_x.clear()

    def observe(layer: int, x: Tensor, y: Tensor) -> None:
        for c in calibrations:
            c.observe(layer, x, y)

    for s, batch in enumerate(batches):
        n = run_captured(model, batch, observe)
        for c in calibrations:
            c.step(n)
        if s % 10 == 0 or s == steps - 1:
            log(f"step {s + 1}/{steps} " + "; ".join(
                f"E={c.cfg.experts} K={c.cfg.top_k} pa={c.report.pa_loss[-1]:.5f} agree={c.report.label_agreement[-1]:.3f} "
                f"relerr={c.report.relative_error[-1]:.4f}" for c in calibrations) + f" [{time.perf_counter() - start:.0f}s]")
    seconds = time.perf_counter() - start
    results = []
    for i, c in enumerate(calibrations):
        c.report.seconds = seconds
        name = names[i] if names else f"factor-e{c.cfg.experts}-k{c.cfg.top_k}"
        results.append((c.bank(name, base), c.report))
    return results


def save_report(report: CalibrationReport, folder: str | Path) -> None:
    """``calibration.json`` next to the bank (ignored by the bank loader)."""
    Path(folder, "calibration.json").write_text(json.dumps({**report.summary(), "history": {
        "pa_loss": report.pa_loss, "label_agreement": report.label_agreement,
        "relative_error": report.relative_error, "scales": report.scales}}, indent=1) + "\n")
