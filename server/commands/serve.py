"""``moleserve serve``: the OpenAI-compatible HTTP server (uvicorn) around the engine and the banks.

Every flag is a field of ``server.settings.Settings`` (also settable as ``MOLESERVE_<FIELD>``).
SIGTERM (or Ctrl-C) drains: new requests get 503, in-flight ones may finish for ``--grace-period``
seconds, the rest are aborted, and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

HELP = "serve the OpenAI-compatible HTTP API with expert banks"

log = logging.getLogger("moleserve.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from server.settings import add_arguments as add_settings

    add_settings(parser)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from server.cli import UserError
    from server.settings import settings_from_args

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise UserError("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                                  for e in exc.errors())) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine, banks = build_engine(settings)
    from server.api.app import create_app

    app = create_app(settings, engine, banks)
    if settings.first_run_bank:
        start_first_run_bank(banks, settings.model)
    return serve_app(app, settings)


def start_first_run_bank(registry: Any, model: str | None) -> None:
    """Train (once, cached) and hot-load the first-run bank without delaying the server.

    Training runs in a child process (its own torch threads; a crash there cannot take the server
    down); a daemon thread waits for it and loads the bank into the registry when it is ready.
    """
    import atexit
    import subprocess
    import sys
    import threading

    from server.model.embedded import cache_dir

    banks_dir = cache_dir() / "banks"
    banks_dir.mkdir(parents=True, exist_ok=True)
    registry.add_root(banks_dir)
    cmd = [sys.executable, "-m", "adapters.train.first_run", str(cache_dir())]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    atexit.register(lambda: proc.poll() is None and proc.kill())

    def wait_and_load() -> None:
        out = proc.communicate()[0] or ""
        if proc.returncode != 0:
            log.error("first-run bank: training failed (exit %s): %s", proc.returncode, out.strip()[-2000:])
            return
        path = out.strip().splitlines()[-1].split(" (")[0]
        try:
            info = registry.load_sync("commonsense-dynmole", path)
        except Exception as exc:  # noqa: BLE001 - the server keeps serving without it
            log.error("first-run bank: not loaded: %s", exc)
            return
        log.info("first-run bank loaded: %s", info.get("name") if isinstance(info, dict) else info)

    log.info("first-run bank: preparing %s in the background", banks_dir / "commonsense-dynmole")
    threading.Thread(target=wait_and_load, name="first-run-bank", daemon=True).start()


def build_engine(settings: Any) -> tuple[Any, Any]:
    """The engine (model loaded now, so a bad model fails before the port opens) and the bank
    registry, with ``--banks`` loaded."""
    import torch

    from adapters.runtime.registry import BankAdminError, BankRegistry, serving_bank_dtype
    from server.cli import UserError
    from server.engine.async_engine import AsyncEngine
    from server.engine.config import EngineConfig, EngineConfigError
    from server.engine.llm_engine import LLMEngine

    from .common import resolve_model_path
    from server.model.embedded import cache_dir

    mem = settings.kv_cache_memory
    try:
        config = EngineConfig(
            model=resolve_model_path(settings.model), device=settings.device, dtype=settings.dtype,
            quantization=settings.quantization,
            kv_cache_memory=int(mem) if mem is not None and mem > 1 else mem, max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            long_prefill_token_threshold=settings.long_prefill_token_threshold, max_model_len=settings.max_model_len,
            max_waiting=settings.max_waiting, vision_tower=settings.vision_tower,
            visual_routing=settings.visual_routing, encoder_cache_memory=settings.encoder_cache_memory,
            enable_prefix_caching=settings.enable_prefix_caching, enforce_eager=settings.enforce_eager,
            cuda_graph_max_batch=settings.cuda_graph_max_batch)
        config.resolved_device()
    except EngineConfigError as exc:
        raise UserError(str(exc)) from None
    llm = LLMEngine(config)
    bank_dtype = (serving_bank_dtype(llm.model.dtype, llm.model.device, getattr(llm.model, "quantization", "none"))
                  if settings.bank_dtype == "auto"
                  else getattr(torch, settings.bank_dtype))
    from adapters.parrot.bank import TowerSpec

    vision = getattr(llm, "vision", None)  # parrot banks load only on a base with a vision tower they fit
    registry = BankRegistry(llm.model_config, device=llm.model.device, dtype=bank_dtype,
                            allowed_roots=settings.bank_root, memory_bytes=bank_memory_bytes(settings.bank_memory),
                            load_workers=settings.bank_load_workers, load_timeout=settings.bank_load_timeout,
                            pool_memory_bytes=pool_memory_bytes(settings), max_loaded=settings.max_loaded_banks,
                            on_demand=settings.load_banks_on_demand, negative_ttl=settings.bank_negative_ttl,
                            convert_cache=cache_dir() / "converted-banks",
                            tower=TowerSpec.of(vision.tower) if vision else None)
    if settings.banks is not None:
        try:
            loaded, errors = registry.load_dir(settings.banks)
        except BankAdminError as exc:
            raise UserError(str(exc)) from None
        log.info("banks loaded from %s: %s%s", settings.banks, ", ".join(loaded) or "none",
                 f" ({len(errors)} refused, see above)" if errors else "")
    llm.set_adapter_provider(registry)
    from server.engine import cpu_threads

    cpu_threads.release_thread_pool()  # the building thread's OpenMP pool: the step thread is the one to own a team
    return AsyncEngine(config, engine=llm, own_cpu_threads=True), registry


def bank_memory_bytes(setting: float | None) -> int:
    """``--bank-memory`` in bytes: bytes as given (> 1), else that fraction of the machine's
    physical memory (default 0.25)."""
    import os

    if setting is not None and setting > 1:
        return int(setting)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * (0.25 if setting is None else setting))


def pool_memory_bytes(settings: Any) -> int | None:
    """``--bank-pool-memory`` in bytes: as given (> 1), else that fraction of ``--bank-memory``."""
    setting = settings.bank_pool_memory
    if setting is None:
        return None
    return int(setting) if setting > 1 else int(setting * bank_memory_bytes(settings.bank_memory))


def serve_app(app: Any, settings: Any) -> int:
    import uvicorn

    from server.api.lifecycle import DrainingServer

    from server.api.http_protocol import protocol_with

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5, lifespan="on", http=protocol_with(settings.header_timeout),
                            timeout_keep_alive=settings.keep_alive_timeout, limit_concurrency=settings.max_connections)
    DrainingServer(config, app, settings.grace_period).run()
    return 0
