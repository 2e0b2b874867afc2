"""moleserve on Ray Serve: engine replicas across nodes, requests routed by bank.

    serve run server.distributed.ray_serve:build_app model=/models/base banks=/srv/banks num_replicas=2 api_key=K

Two deployments:

- ``Ingress`` (one replica by default): the standalone server's FastAPI app (``server.api``: the
  same routes, validation, errors and streaming), built with a ``RemoteEngine`` in place of the
  in-process engine and a ``BankCatalog`` in place of the bank registry. It tokenizes, validates
  and renders; it holds no weights.
- ``EngineReplica`` (``num_replicas`` or autoscaling): one moleserve engine each (model, KV cache,
  its own bank registry and metrics). A request arrives with ``multiplexed_model_id`` = its bank;
  Serve sends it to a replica that has the bank loaded while that replica has room, and a replica
  loads a bank it lacks through its multiplex loader (at most ``max_banks_per_replica`` cached;
  the least recently used is unloaded; running requests keep their version).

``build_app(args)``: every ``moleserve serve`` setting that applies (``model``, ``banks``,
``bank_root``, ``api_key``, ``admin_key``, ``max_num_seqs``, ``kv_cache_memory``, ...; ``host`` and
``port`` belong to Serve's proxy) plus the Ray options in ``RAY_DEFAULTS``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from ray import serve

from server.engine.protocol import EngineError, GenerationRequest
from server.settings import Settings

from .remote_engine import Refused

log = logging.getLogger(__name__)

RAY_DEFAULTS: dict[str, Any] = {
    "num_replicas": 1,  # engine replicas (ignored with autoscaling)
    "min_replicas": None,  # set either of these two for autoscaling on ongoing requests
    "max_replicas": None,
    "target_ongoing_requests": 16,  # autoscaling target per engine replica
    "max_ongoing_requests": None,  # per engine replica; default: max_num_seqs + max_waiting
    "max_banks_per_replica": 8,  # the multiplex cache: banks one replica keeps loaded
    "num_gpus": None,  # per engine replica; default: 1 when Ray sees GPUs in the cluster, else 0
    "num_cpus": 1,  # per engine replica
    "replica_resources": None,  # custom Ray resources per engine replica (a dict or its JSON)
    "ingress_replicas": 1,
    "request_retries": 8,  # sends of a request that has not started when its replica fails
}
_NOT_SETTINGS = ("host", "port", "first_run_bank")


def split_args(args: dict[str, Any]) -> tuple[Settings, dict[str, Any]]:
    """``serve run`` arguments (all strings there; Python values here) -> (settings, Ray options).
    Unknown names are refused, so a typo does not pass silently."""
    ray_opts = dict(RAY_DEFAULTS)
    fields: dict[str, Any] = {}
    for key, value in args.items():
        name = key.replace("-", "_")
        if name in RAY_DEFAULTS:
            ray_opts[name] = value
        elif name in Settings.model_fields and name not in _NOT_SETTINGS:
            fields[name] = value.split(",") if name == "bank_root" and isinstance(value, str) else value
        else:
            raise ValueError(f"unknown argument {key!r}: moleserve settings {sorted(set(Settings.model_fields) - set(_NOT_SETTINGS))} "
                             f"or Ray options {sorted(RAY_DEFAULTS)}")
    for name in ("num_replicas", "max_banks_per_replica", "ingress_replicas", "request_retries", "target_ongoing_requests"):
        ray_opts[name] = int(ray_opts[name])
    for name in ("min_replicas", "max_replicas", "max_ongoing_requests"):
        if ray_opts[name] is not None:
            ray_opts[name] = int(ray_opts[name])
    for name in ("num_gpus", "num_cpus"):
        if ray_opts[name] is not None:
            ray_opts[name] = float(ray_opts[name])
    if isinstance(ray_opts["replica_resources"], str):
        ray_opts["replica_resources"] = json.loads(ray_opts["replica_resources"])
    return Settings(**fields), ray_opts


def _settings_dict(settings: Settings) -> dict[str, Any]:
    """What a replica needs to rebuild the settings (keys stay in the ingress)."""
    data = settings.model_dump(mode="json", exclude={"api_key", "admin_key"})
    return {k: v for k, v in data.items() if v is not None}


class EngineReplica:
    """One moleserve engine: the model, its KV cache, a bank registry and metrics."""

    def __init__(self, settings: dict[str, Any], max_banks: int):
        from server.commands.serve import build_engine
        from server.metrics import ServerMetrics

        s = Settings(**{**settings, "banks": None})  # banks come through the multiplex loader
        roots = list(s.bank_root) + ([Path(settings["banks"])] if settings.get("banks") else [])
        self.engine, self.registry = build_engine(s.model_copy(update={"bank_root": roots}))
        self.model_name = s.served_model_name or self.engine.model_config.name
        self.metrics = ServerMetrics(self.model_name)
        self.engine.set_stats_sink(self.metrics)
        ctx = serve.get_replica_context()
        self.name = f"{ctx.deployment}#{ctx.replica_id.unique_id}"
        self._locations: dict[str, tuple[str, int]] = {}  # bank -> (folder, catalog version)
        self._loaded: dict[str, int] = {}  # bank -> catalog version in the registry
        self._resident: dict[str, tuple[str, ...]] = {}  # multiplexed id -> its banks

        async def load(model_id: str) -> _Resident:
            return await self._load(model_id)

        self._bank = serve.multiplexed(max_num_models_per_replica=max_banks)(load)

    async def _ensure_started(self) -> None:
        if not self.engine.is_running:
            await self.engine.start()

    async def describe(self) -> dict[str, Any]:
        """What the ingress needs to validate and render requests without the weights."""
        await self._ensure_started()
        return {"tokenizer": self.engine.tokenizer, "model_config": self.engine.model_config,
                "max_model_len": self.engine.max_model_len, "model_name": self.model_name}

    async def generate(self, request: GenerationRequest, banks: dict[str, tuple[str, int]]):
        """Stream one request's events, preceded by this replica's name. Admission errors come
        back as a ``Refused`` value; cancelling the call aborts the request."""
        await self._ensure_started()
        yield self.name
        try:
            if request.bank:
                self._locations.update(banks)
                await self._bank(request.bank)  # the multiplex loader: loaded here, or loaded now
                await self._refresh(request.bank)
            stream = self.engine.submit(request)
        except EngineError as exc:
            yield Refused.of(exc)
            return
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()  # no-op when finished; aborts otherwise (the caller went away)

    async def stats(self) -> dict[str, Any]:
        """This replica's name, its loaded banks and its Prometheus text."""
        from server.api.app import _engine_load, _report_capacity

        load = _engine_load(self.engine)
        if load is not None:
            self.metrics.set_load(*load)
        _report_capacity(self.engine, self.metrics)
        return {"replica": self.name, "banks": sorted(self._loaded), "metrics": self.metrics.render().decode()}

    # -- banks -----------------------------------------------------------------------------------

    async def _load(self, model_id: str) -> "_Resident":
        for bank in model_id.split("+"):
            await self._load_bank(bank)
        self._resident[model_id] = tuple(model_id.split("+"))
        return _Resident(self, model_id)

    async def _refresh(self, model_id: str) -> None:
        """A bank replaced in the catalog since this replica loaded it: load the new version
        (running requests keep the old one)."""
        for bank in model_id.split("+"):
            if bank in self._locations and self._locations[bank][1] != self._loaded.get(bank):
                await self._load_bank(bank)

    async def _load_bank(self, bank: str) -> None:
        if bank not in self._locations:
            from server.engine.protocol import UnknownBank

            raise UnknownBank(f"bank {bank!r} is not in the catalog")
        path, version = self._locations[bank]
        if self._loaded.get(bank) == version:
            return
        try:
            await self.registry.load(bank, path)
        except EngineError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bank error with a status (400, 404)
            err = EngineError(str(exc))
            err.status, err.type = getattr(exc, "status", 500), getattr(exc, "type", "server_error")
            raise err from None
        self._loaded[bank] = version

    def _evicted(self, model_id: str) -> None:
        """The multiplex cache dropped ``model_id``: unload its banks no other cached id uses."""
        parts = self._resident.pop(model_id, ())
        still = {b for v in self._resident.values() for b in v}
        for bank in parts:
            if bank not in still and self._loaded.pop(bank, None) is not None:
                try:
                    self.registry.unload_sync(bank)
                except Exception:  # noqa: BLE001 - already gone
                    pass


class _Resident:
    """What the multiplex loader returns; Serve calls ``__del__`` when it evicts the entry."""

    def __init__(self, replica: EngineReplica, model_id: str):
        self.replica, self.model_id, self.done = replica, model_id, False

    def __del__(self) -> None:
        if not self.done:
            self.done = True
            self.replica._evicted(self.model_id)


class Ingress:
    """The OpenAI-compatible routes of ``server.api`` over the engine replicas."""

    def __init__(self, engine_handle: Any, settings: dict[str, Any], secrets: dict[str, str | None],
                 retries: int):
        self.handle, self.retries = engine_handle, retries
        self.settings = Settings(**settings, **{k: v for k, v in secrets.items() if v})

    async def __serve_build_asgi_app__(self):
        from adapters import BaseFingerprint
        from server.api.app import create_app

        from .catalog import BankCatalog
        from .remote_engine import RemoteEngine, ReplicaHeaderMiddleware

        engine = RemoteEngine(self.handle, None, retries=self.retries)
        await engine.start()  # the tokenizer and model config, from a replica
        catalog = BankCatalog(BaseFingerprint.from_hf_config(engine.model_config.raw), self.settings.bank_root)
        if self.settings.banks is not None:
            loaded, errors = await asyncio.to_thread(catalog.load_dir, self.settings.banks)
            log.info("bank catalog from %s: %s%s", self.settings.banks, ", ".join(loaded) or "none",
                     f" ({len(errors)} refused)" if errors else "")
        engine.catalog = catalog
        app = create_app(self.settings, engine, catalog)
        app.add_middleware(ReplicaHeaderMiddleware)
        return app


def build_app(args: dict[str, Any]):
    """The Serve application for ``serve run server.distributed.ray_serve:build_app key=value ...``."""
    settings, opts = split_args(args)
    import ray

    num_gpus = opts["num_gpus"]
    if num_gpus is None:
        num_gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    actor = {"num_cpus": opts["num_cpus"], "num_gpus": num_gpus}
    if opts["replica_resources"]:
        actor["resources"] = dict(opts["replica_resources"])
    engine_opts: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": opts["max_ongoing_requests"] or settings.max_num_seqs + settings.max_waiting,
        "health_check_period_s": 2, "health_check_timeout_s": 30,
    }
    if opts["min_replicas"] is not None or opts["max_replicas"] is not None:
        lo = opts["min_replicas"] if opts["min_replicas"] is not None else 1
        engine_opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": max(lo, opts["max_replicas"] or lo),
                                             "target_ongoing_requests": opts["target_ongoing_requests"]}
    else:
        engine_opts["num_replicas"] = opts["num_replicas"]
    replica_settings = _settings_dict(settings)
    engines = serve.deployment(EngineReplica, name="EngineReplica").options(**engine_opts).bind(
        replica_settings, opts["max_banks_per_replica"])
    secrets = {"api_key": Settings.secret(settings.api_key), "admin_key": Settings.secret(settings.admin_key)}
    ingress_cls = serve.ingress()(Ingress)
    ingress = serve.deployment(ingress_cls, name="Ingress").options(
        num_replicas=opts["ingress_replicas"], ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1000, 4 * engine_opts["max_ongoing_requests"]))
    return ingress.bind(engines, replica_settings, secrets, opts["request_retries"])
