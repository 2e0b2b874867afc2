"""The bank registry: the engine's ``AdapterProvider`` and the server's bank admin.

Loading (file I/O, conversion, validation, packing) runs off the engine thread; only the swap and
the copy into free pool slots happen under the lock, between two ``build_step`` calls. Each load
makes a new *version*; ``acquire`` pins the current version of a name for a request's lifetime, so
a replace never changes a running request's weights, and a retired version is freed when its last
request releases it.

The device pool stays within ``pool_memory_bytes``: a bank that does not fit evicts the least
recently used banks with no request in flight (their weights stay in host memory and come back on
the next ``build_step`` that needs them). When the banks of one step alone exceed the budget the
pool grows past it rather than fail requests (``over_budget`` in ``list()`` says so).

Factor banks (``kind: factor``, FactorLLM) never enter the pool: their experts are the base
model's FFN weights packed in expert order (``adapters.factor.load_factor_weights``), so the
registry needs the model (``model=`` or ``attach_model``; the engine attaches its model in
``set_adapter_provider``). A request may name ``factor+bank``: the factor bank's FFN with another
bank's (non-MixLoRA) LoRA experts on top; ``acquire`` pins both versions.

Parrot banks (``kind: parrot``) never enter the pool either: each version holds a ``VisualAdapter``
(projector + visual mixture) that the engine applies to the request's images; the handle exposes
it as ``visual_adapter``. They load only on a base with a vision tower the bank was trained for
(``tower=``, a ``TowerSpec``), and apply nothing to the LLM's linears.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters import BankError, BaseFingerprint, ExpertBank, load_bank, resolve_bank_path
from adapters.parrot.bank import TowerSpec, check_tower, visual_adapter
from adapters.errors import BankBudgetExceeded
from server.engine.protocol import InvalidRequest, UnknownBank
from server.model import ModelConfig

from .layout import BankLayout, build_layout
from .convert_cache import ConvertedCache, is_ecosystem_checkpoint
from .pool import SlotPool
from .residency import NegativeCache, ResidencyStats, find_on_disk, valid_on_demand_name
from .step import BankStep, StepBank

log = logging.getLogger(__name__)

# A bank loaded on demand is kept this long for the requests that waited for it to acquire it (else
# another load finishing first could evict it again before they run, over and over).
ON_DEMAND_HOLD_S = 2.0

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class BankAdminError(Exception):
    """A bank admin request was refused; ``status`` is the HTTP status the API answers with."""

    status = 400
    type = "invalid_request_error"


class BankNotFound(BankAdminError):
    status = 404
    type = "not_found_error"


class BankLoadError(BankAdminError):
    """The bank files were refused (the message names the file and the reason)."""

    status = 400


def load_bank_folders(admin, folder: str | Path, logger: logging.Logger = log) -> tuple[list[str], list[str]]:
    """Every sub-folder of ``folder`` (``--banks``) through ``admin.load_sync(name, path)``, name =
    folder name, after ``admin.add_root(folder)``; the registry's and the Ray Serve catalog's
    ``load_dir``. Returns (loaded names, error messages); a refused bank (``BankAdminError``) is
    logged on ``logger`` and does not stop the others."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BankAdminError(f"--banks {str(folder)!r} is not a folder")
    admin.add_root(folder)
    loaded, errors = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            admin.load_sync(sub.name, sub)
            loaded.append(sub.name)
        except BankAdminError as exc:
            errors.append(f"{sub}: {exc}")
            logger.error("bank %s not loaded: %s", sub.name, exc)
    return loaded, errors


class BankCombinationRefused(InvalidRequest):
    """A request named banks that cannot run together (``factor+lora``: see ``BankRegistry.acquire``)."""

    status = 400
    type = "invalid_request_error"
    code = "bank_combination_refused"
    param = "model"


class BankOutOfService(UnknownBank):
    """The bank failed while running and was taken out of service until an admin reloads it (503)."""

    status = 503
    type = "service_unavailable"
    code = "bank_failed"
    param = "model"


class BankOverBudget(BankAdminError):
    """Loading would take the loaded banks past the bank memory budget (``--bank-memory``)."""

    status = 409
    type = "conflict_error"


class BankLoadUnavailable(BankAdminError):
    """Every load worker is busy (503), or the load did not finish in time (504)."""

    status = 503
    type = "service_unavailable"


class BankWorkersBusy(BankLoadUnavailable):
    """Every load worker is busy (503); an on-demand load waits for one instead (up to its deadline)."""


class BankHostFull(BankLoadUnavailable):
    """Host memory holds ``max_loaded`` banks and none can be evicted now (503). ``waitable``: some
    of them only have requests in flight (not pinned), so room comes when those finish."""

    waitable = False


class BankPathRefused(BankAdminError):
    """A path outside the allowed roots (400), or one that does not exist (404)."""

    status = 400


class BankNotOnDisk(BankNotFound):
    """A request named a bank that is neither loaded nor a folder ``<root>/<name>`` (404)."""

    code = "model_not_found"
    param = "model"


@dataclass(eq=False)
class BankVersion:
    """One loaded version of a named bank."""

    name: str
    version: int  # registry-wide counter, increases with every load
    layout: BankLayout
    source: str
    label: str = ""  # the bank's own version string
    refs: int = 0
    retired: bool = False
    offset: int | None = None  # slot offset in the device pool; None: host memory only
    factor: object | None = None  # kind factor: its FactorWeights (None until a model is attached)
    host_bank: ExpertBank | None = None  # kind factor, no model attached yet: the bank to pack later
    visual: object | None = None  # kind parrot: its VisualAdapter on the registry's device
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float = field(default_factory=time.time)
    failed: str | None = None  # why the engine took it out of service (see ``BankRegistry.fail``)
    pinned: bool = True  # never evicted from host memory (loaded at start or by the admin API)
    held_until: float = 0.0  # loaded on demand: not evicted before its waiting requests acquire it


@dataclass(eq=False)
class BankHandle:
    """What ``acquire`` returns: a request's pin on one version, or on two for ``factor+bank``.

    bank: the pooled (LoRA-expert) bank's version, None for a factor or parrot bank alone; factor:
    the factor bank's version, if any; visual: the parrot bank's version, if any."""

    bank: BankVersion | None
    released: bool = False
    factor: BankVersion | None = None
    visual: BankVersion | None = None

    @property
    def versions(self) -> list[BankVersion]:
        return [v for v in (self.factor, self.visual, self.bank) if v is not None]

    @property
    def visual_adapter(self):
        """The parrot bank's ``VisualAdapter`` for this request's images (None: not a parrot bank)."""
        return None if self.visual is None else self.visual.visual

    @property
    def name(self) -> str:
        return "+".join(v.name for v in self.versions)

    @property
    def version(self) -> int:
        return (self.bank or self.factor or self.visual).version

    @property
    def cache_key(self) -> tuple:
        """What KV blocks computed with this handle depend on (the prefix cache's extra key): every
        pinned version, which is unique registry-wide, so a reloaded bank never reuses old blocks."""
        return tuple((v.name, v.version) for v in self.versions)


def checked_bank_request(name: str, path: str | Path, allowed_roots) -> Path:
    """The checks of a load request before any file is read: a valid bank name, and a path that
    resolves inside the allowed roots (BankAdminError; a missing path is a 404). Returns the
    resolved path. Shared by the registry and the Ray Serve ingress's catalog."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BankAdminError(f"bank name {name!r} is invalid: 1-128 characters from A-Z a-z 0-9 . _ -, "
                             "starting with a letter or digit")
    try:
        return resolve_bank_path(path, allowed_roots)
    except BankError as exc:
        err = BankPathRefused(str(exc))
        if "does not exist" in str(exc):
            err.status, err.type = 404, "not_found_error"
        raise err from None


def serving_bank_dtype(model_dtype: torch.dtype, device: torch.device | str, quantization: str = "none"
                       ) -> torch.dtype:
    """The pool's storage dtype for ``serve --bank-dtype auto`` (``quantization``: the base linears',
    ``LlamaModel.quantization``):

    - int8 (each row int8 with one fp32 scale) on the CPU when the base itself is served quantized
      (int4 / int8, the embedded default's GGUF blocks): a decode step with many banks is bound by
      the bytes of expert weights it reads, and int8 halves float16's (8 DynMoLE banks: 0.78x vs
      0.70x the quantized base's tokens/s served, BENCHMARKS.md "Quantized base (issue #21)"). Its
      rounding (255 levels per row; ~1e-2 in log-probability on the equivalence tests' random banks)
      is finer than the 4-bit base's own (16 levels per group of 32); a trained DynMoLE bank gave
      the same answer on all 400 test items in float32, float16 and int8 (BENCHMARKS.md "int8 and
      float16 expert pools on a trained bank").
    - float16 for a float32 model on the CPU: float32 experts would read ~580 MB a step for 8
      DynMoLE banks, more than the 135M-parameter base; float16 halves them (0.74x -> 0.82x the
      base model's tokens/s, BENCHMARKS.md "Expert banks") and keeps 11 significant bits: the
      equivalence tests hold at 1e-3 in log-probability with it.
    - otherwise the model's dtype.

    Compute and accumulation stay fp32; ``--bank-dtype float32`` keeps the weights exact."""
    if torch.device(device).type == "cpu":
        if quantization in ("int4", "int8"):
            return torch.int8
        if model_dtype == torch.float32:
            return torch.float16
    return model_dtype


class BankRegistry:
    """Banks by name, their versions, and the device slot pool they run from.

    model_config: the served model's config (its fingerprint is checked on every load).
    dtype: the pool's storage dtype (float32 by default here; the server's default is
        ``serving_bank_dtype``: int8 on a quantized CPU base, float16 for a float32 CPU model, which
        halve the memory and the bandwidth of routed LoRA calls).
    pool_memory_bytes: budget of the device pool (None: unbounded).
    memory_bytes: budget of every loaded bank version together, in bytes of their packed weights
        (None: unbounded); a load past it is refused (409) naming the budget, before the weights
        of our format are read (their declared sizes count).
    load_workers, load_timeout: ``load`` runs at most ``load_workers`` loads at once, each on its
        own daemon thread, and gives up on one after ``load_timeout`` seconds (the stuck thread
        can neither swap its bank in later nor keep the process from exiting).
    allowed_roots: folders client-supplied paths must resolve into.
    max_loaded: banks host memory holds at once (None: unbounded). Loading one more evicts the
        least recently used bank that is not pinned and has no request in flight (back to disk:
        its next request loads it again); when every loaded bank is pinned or busy the load is
        refused (503). Banks loaded at start or by the admin API are pinned unless told otherwise.
    on_demand: a request naming a bank that is not loaded loads ``<root>/<name>`` from the first
        allowed root that has it (``ensure``); concurrent requests share one load.
    convert_cache: folder where ecosystem checkpoints are kept once converted (None: convert on
        every load); see ``convert_cache.ConvertedCache``.
    negative_ttl: seconds a name that was not found, or whose files failed to load, is answered
        from memory (sooner when the folder changes; see ``residency.NegativeCache``).
    tower: the served model's vision tower (None: no tower, parrot banks are refused).
    """

    def __init__(self, model_config: ModelConfig, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, pool_memory_bytes: int | None = None,
                 allowed_roots=(), collect_stats: bool = True, backend: str = "auto", model=None,
                 tower: TowerSpec | None = None, memory_bytes: int | None = None, load_workers: int = 4,
                 load_timeout: float | None = 120.0, max_loaded: int | None = None, on_demand: bool = False,
                 negative_ttl: float = 30.0, convert_cache: str | Path | None = None):
        self.config = model_config
        self.tower = tower
        self.model = model  # needed by factor banks (their experts are the model's FFN weights)
        self.fingerprint = BaseFingerprint.from_hf_config(model_config.raw)
        self.device = torch.device(device)
        self.dtype = dtype
        self.pool_memory_bytes = pool_memory_bytes
        self.memory_bytes = memory_bytes  # host bytes all loaded versions may hold (None: unbounded)
        self.load_timeout = load_timeout
        self._load_slots = threading.BoundedSemaphore(load_workers)
        self.allowed_roots: list[Path] = [Path(r) for r in allowed_roots]
        self.collect_stats = collect_stats
        self.backend = backend
        self.pool = SlotPool(model_config, device=self.device, dtype=dtype)
        self._lock = threading.RLock()
        self._current: dict[str, BankVersion] = {}
        self._failed: dict[str, BankVersion] = {}  # taken out of service by a fault; listed until reloaded
        self._live: list[BankVersion] = []  # every version holding memory (current or pinned)
        self._counter = itertools.count(1)
        self.over_budget = False
        self.max_loaded = max_loaded
        self.on_demand_hold = ON_DEMAND_HOLD_S  # seconds a bank loaded on demand is kept for its waiting requests
        self.converted = ConvertedCache(convert_cache) if convert_cache is not None else None
        self.on_demand = on_demand
        self.stats = ResidencyStats()
        self._misses = NegativeCache(negative_ttl)
        self._loading: dict[str, asyncio.Future] = {}  # on-demand loads in progress, shared by their requests
        self._on_disk: collections.OrderedDict[str, dict] = collections.OrderedDict()  # evicted: last description

    # -- admin -----------------------------------------------------------------------------------

    def list(self) -> list[dict]:
        """Loaded banks (``state: ready``), then banks taken out of service (``state: failed``).
        ``tier`` says where a loaded bank is: ``pool`` (in the device expert pool) or ``host``."""
        with self._lock:
            return [self._describe(v) for v in (*self._current.values(), *self._failed.values())]

    def list_on_disk(self) -> list[dict]:
        """Banks evicted from host memory (``tier: disk``) as they were last described; their
        next request loads them again. At most the last 4096 evicted."""
        with self._lock:
            return [dict(d) for name, d in self._on_disk.items() if name not in self._current]

    def get(self, name: str) -> dict:
        with self._lock:
            v = self._current.get(name) or self._failed.get(name)
            if v is None:
                raise BankNotFound(f"bank {name!r} is not loaded")
            return self._describe(v)

    def _describe(self, v: BankVersion) -> dict:
        factor = v.layout.kind == "factor"
        if v.layout.kind == "parrot":
            resident = v.visual is not None
            nbytes = sum(t.numel() * t.element_size() for t in v.visual.state_dict().values()) if resident else 0
        else:
            resident = v.factor is not None if factor else v.offset is not None
            nbytes = v.factor.nbytes() if factor and v.factor is not None else v.layout.nbytes
        return {"name": v.name, "version": v.version, "bank_version": v.label, "kind": v.layout.kind,
                "num_experts": v.layout.packed.num_slots, "rank": v.layout.packed.rank, "source": v.source,
                "resident": resident, "in_flight": sum(x.refs for x in self._live if x.name == v.name),
                "bytes": nbytes, "loaded_at": v.loaded_at, "state": "failed" if v.failed else "ready",
                "tier": "pool" if resident else "host", "pinned": v.pinned,
                **({"error": v.failed} if v.failed else {})}

    def attach_model(self, model) -> None:
        """Give the registry the served model (a ``server.model.LlamaModel``): factor banks pack
        their experts from its FFN weights. Factor banks added before are packed now."""
        if BaseFingerprint.from_hf_config(model.config.raw) != self.fingerprint:
            raise ValueError("attach_model: the model is not the one this registry serves")
        self.model = model
        with self._lock:
            pending = [v for v in self._live if v.host_bank is not None]
        for v in pending:
            weights = _pack_factor(v.host_bank, model)
            with self._lock:
                if v.host_bank is not None:
                    v.factor, v.host_bank = weights, None

    def add_root(self, root: str | Path) -> None:
        with self._lock:
            if Path(root) not in self.allowed_roots:
                self.allowed_roots.append(Path(root))

    async def load(self, name: str, path: str | Path, *, pinned: bool = True, trigger: str = "admin") -> dict:
        """Load (or replace) ``name`` from ``path`` off the event loop, on a bounded set of daemon
        threads, within ``load_timeout`` seconds. ``pinned``: never evicted from host memory."""
        if not self._load_slots.acquire(blocking=False):
            raise BankWorkersBusy("every bank load worker is busy (a load may be stuck on its files); retry later")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        given_up = threading.Event()

        def settle(result, exc) -> None:
            if not done.done():
                done.set_exception(exc) if exc is not None else done.set_result(result)

        def work() -> None:
            try:
                result, exc = self.load_sync(name, path, given_up=given_up, pinned=pinned, trigger=trigger), None
            except BaseException as e:  # noqa: BLE001 - handed to the waiting coroutine
                result, exc = None, e
            finally:
                self._load_slots.release()
            try:
                loop.call_soon_threadsafe(settle, result, exc)
            except RuntimeError:  # the loop is gone (shutdown): nobody waits for this load
                pass

        threading.Thread(target=work, name=f"bank-load-{name}", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(done), self.load_timeout)
        except TimeoutError:
            given_up.set()
            err = BankLoadUnavailable(f"loading bank {name!r} did not finish within {self.load_timeout:g} seconds")
            err.status, err.type = 504, "timeout_error"
            raise err from None

    async def unload(self, name: str) -> None:
        self.unload_sync(name)

    def load_sync(self, name: str, path: str | Path, *, given_up: threading.Event | None = None,
                  pinned: bool = True, trigger: str = "admin") -> dict:
        """Resolve ``path`` inside the allowed roots, load any supported format, validate, pack,
        then swap in. On any error the registry is left exactly as it was. ``trigger`` (``admin``
        or ``on_demand``) labels the load in the residency statistics."""
        start = time.perf_counter()
        try:
            info = self._load_sync(name, path, given_up=given_up, pinned=pinned,
                                   hold=self.on_demand_hold if trigger == "on_demand" else 0.0)
        except BaseException:
            with self._lock:
                self.stats.loads[(trigger, "error")] += 1
            raise
        with self._lock:
            self.stats.loads[(trigger, "ok")] += 1
            self.stats.observe_load(time.perf_counter() - start)
        return info

    def _load_sync(self, name: str, path: str | Path, *, given_up: threading.Event | None, pinned: bool,
                   hold: float = 0.0) -> dict:
        real = checked_bank_request(name, path, self.allowed_roots)
        try:
            max_bytes = self._room_for(name, reclaim=self.max_loaded is not None)
            cached = self.converted is not None and is_ecosystem_checkpoint(real)
            bank = self.converted.get(real, self.fingerprint, name, max_bytes) if cached else None
            if bank is None:
                bank = load_bank(real, base=self.fingerprint, name=name, max_bytes=max_bytes)
                if cached:
                    self.converted.put(real, self.fingerprint, bank)
        except BankBudgetExceeded as exc:
            raise BankOverBudget(str(exc)) from None
        except BankError as exc:
            raise BankLoadError(str(exc)) from None
        return self.add(bank, source=str(real), given_up=given_up, pinned=pinned, hold=hold)

    def _room_for(self, name: str, reclaim: bool = False) -> int | None:
        """Bytes a new version of ``name`` may take: the budget less every other live version (the
        version it replaces stays while requests pin it, so it counts too). ``reclaim``: banks
        that eviction may take out of host memory count as free."""
        if self.memory_bytes is None:
            return None
        with self._lock:
            free = {id(v) for v in self._evictable(name)} if reclaim else set()
            return max(self.memory_bytes - sum(self._bytes(v) for v in self._live if id(v) not in free), 0)

    @staticmethod
    def _bytes(v: BankVersion) -> int:
        return v.factor.nbytes() if v.factor is not None else v.layout.nbytes

    def add(self, bank: ExpertBank, *, name: str | None = None, source: str = "<memory>",
            given_up: threading.Event | None = None, pinned: bool = True, hold: float = 0.0) -> dict:
        """Swap in an already validated bank (``load_sync`` does the I/O; tests and tools call this).
        ``given_up``: set when the caller stopped waiting; the bank is then not swapped in.
        Past ``max_loaded`` (or the memory budget) idle unpinned banks are evicted first."""
        name = name or bank.name
        try:
            layout = build_layout(bank, dtype=self.dtype)  # packing: outside the lock
        except BankError as exc:  # a weight the pool's dtype cannot hold
            raise BankLoadError(str(exc)) from None
        factor = host = visual = None
        if bank.kind == "factor":  # packed from the model's FFN weights, never in the slot pool
            if self.model is not None:
                factor = _pack_factor(bank, self.model)
            else:
                host = bank
        elif bank.kind == "parrot":  # a projector + visual mixture for the request's images
            visual = self._visual_adapter(bank)
        with self._lock:
            if given_up is not None and given_up.is_set():
                raise BankLoadUnavailable(f"loading bank {name!r} was given up (timeout); it was not swapped in")
            size = factor.nbytes() if factor is not None else layout.nbytes
            self._make_host_room(name)
            room = self._room_for(name)
            while room is not None and size > room and self._evictable(name):
                self._evict_host(min(self._evictable(name), key=lambda x: x.last_used))
                room = self._room_for(name)
            if room is not None and size > room:
                raise BankOverBudget(f"bank {name!r} needs {size} bytes; loaded banks leave {room} of the "
                                     f"{self.memory_bytes} byte bank memory budget (--bank-memory); unload a bank first")
            v = BankVersion(name=name, version=next(self._counter), layout=layout, source=source, label=bank.version,
                            factor=factor, host_bank=host, visual=visual, pinned=pinned,
                            held_until=time.monotonic() + hold)
            if bank.kind not in ("factor", "parrot"):
                self._place(v, pinned=set(), over_budget_ok=False)
            old = self._current.get(name)
            self._current[name] = v
            self._failed.pop(name, None)  # a reload puts a failed bank back in service
            self._on_disk.pop(name, None)
            self._misses.forget(name)
            self._live.append(v)
            if old is not None:
                self._retire(old)
            return self._describe(v)

    def _visual_adapter(self, bank: ExpertBank):
        """The parrot bank's VisualAdapter, checked against the served tower: on the registry's device,
        fp32 on the CPU (exact, and its GEMMs are small next to the tower's), else the pool's dtype
        (the model's, by default)."""
        try:
            check_tower(bank, self.tower)
        except BankError as exc:
            raise BankLoadError(str(exc)) from None
        dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        return visual_adapter(bank, device=self.device, dtype=dtype)

    def unload_sync(self, name: str) -> None:
        """Remove ``name``: new requests get UnknownBank; running ones finish on their version."""
        with self._lock:
            v = self._current.pop(name, None)
            if v is None:
                if self._failed.pop(name, None) is not None:
                    return
                raise BankNotFound(f"bank {name!r} is not loaded")
            self._retire(v)

    def load_dir(self, folder: str | Path) -> tuple[list[str], list[str]]:
        """Load every bank folder under ``folder`` (name = folder name) and allow ``folder`` as a
        root. Returns (loaded names, error messages); a broken bank does not stop the others."""
        return load_bank_folders(self, folder)

    # -- engine side (AdapterProvider) ------------------------------------------------------------

    def fail(self, handle: BankHandle, reason: str) -> None:
        """The engine saw ``handle``'s bank fail inside a step: take its versions out of service.
        New requests naming them get ``BankOutOfService`` (503); ``list()`` shows them as failed
        with ``reason``; loading the name again (or unloading it) clears the state."""
        with self._lock:
            for v in handle.versions:
                if v.failed is not None:
                    continue
                v.failed = reason
                if self._current.get(v.name) is v:
                    del self._current[v.name]
                    self._failed[v.name] = v
                    self._retire(v)

    def failure(self, handle: BankHandle) -> str | None:
        """Why ``handle``'s bank was taken out of service, or None while it is in service."""
        return next((v.failed for v in handle.versions if v.failed), None)

    def acquire(self, bank: str) -> BankHandle:
        """Pin the current version of ``bank``, or of both parts of ``factor+other``: a factor
        bank's FFN with another bank's LoRA experts on top. Refused (``BankCombinationRefused``,
        400): more than two parts, a first part that is not a factor bank, two factor banks, or a
        factor bank with a MixLoRA bank (both replace the FFN). A part not loaded: UnknownBank."""
        parts = bank.split("+")
        if len(parts) > 2 or not all(parts):
            raise BankCombinationRefused(f"model {bank!r}: name one bank, or 'factorbank+bank' (a factor bank, "
                                         "then one bank applied on top of it)")
        with self._lock:
            versions = []
            for part in parts:
                v = self._current.get(part)
                if v is None and part in self._failed:
                    raise BankOutOfService(f"bank {part!r} failed while running and is out of service "
                                           f"({self._failed[part].failed}); an admin may reload it")
                if v is None:
                    raise UnknownBank(f"bank {part!r} is not loaded")
                versions.append(v)
            kinds = [v.layout.kind for v in versions]
            if "parrot" in kinds and len(versions) > 1:
                raise BankCombinationRefused(f"model {bank!r}: a parrot bank (a visual adapter) is named alone")
            if len(versions) == 2:
                if kinds[0] != "factor":
                    raise BankCombinationRefused(
                        f"model {bank!r}: in 'a+b' the first bank must be a factor bank; {parts[0]!r} is {kinds[0]!r}")
                if kinds[1] == "factor":
                    raise BankCombinationRefused(f"model {bank!r}: two factor banks cannot serve one request")
                if kinds[1] == "mixlora":
                    raise BankCombinationRefused(
                        f"model {bank!r}: a factor bank and a MixLoRA bank both replace the FFN; they cannot be combined")
            for v in versions:
                if v.layout.kind == "factor" and v.factor is None:
                    raise UnknownBank(f"factor bank {v.name!r} is not ready: the registry has no model to pack "
                                      "its experts from (attach_model)")
            now = time.monotonic()
            for v in versions:
                v.refs += 1
                v.last_used = now
                if v.layout.kind not in ("factor", "parrot"):
                    (self.stats.hits if v.offset is not None else self.stats.misses)["pool"] += 1
            if kinds[0] == "parrot":
                return BankHandle(None, visual=versions[0])
            if kinds[0] == "factor":
                return BankHandle(versions[1] if len(versions) == 2 else None, factor=versions[0])
            return BankHandle(versions[0])

    def release(self, handle: BankHandle | None) -> None:
        if handle is None:
            return
        with self._lock:
            if handle.released:
                return
            handle.released = True
            now = time.monotonic()
            for v in handle.versions:
                v.refs -= 1
                v.last_used = now
                if v.retired and v.refs == 0:
                    self._drop(v)

    def build_step(self, handles: list[BankHandle | None], num_tokens: list[int]) -> BankStep | None:
        """The step's AdapterStep (None when no sequence has a bank). Evicted banks come back here."""
        if all(h is None for h in handles):
            return None
        index: dict[int, int] = {}
        versions: list[BankVersion] = []
        seq_bank = []
        findex: dict[int, int] = {}
        factors, factor_names = [], []
        seq_factor = []
        for h in handles:
            f = None if h is None else h.factor
            if f is None:
                seq_factor.append(-1)
            else:
                j = findex.get(id(f))
                if j is None:
                    j = findex[id(f)] = len(factors)
                    factors.append(f.factor)
                    factor_names.append(f.name)
                seq_factor.append(j)
            if h is None or h.bank is None:
                seq_bank.append(-1)
                continue
            i = index.get(id(h.bank))
            if i is None:
                i = index[id(h.bank)] = len(versions)
                versions.append(h.bank)
            seq_bank.append(i)
        if not versions and not factors:  # only parrot banks (nothing on the LLM) and the base model
            return None
        with self._lock:
            now = time.monotonic()
            pinned = {id(v) for v in versions}
            for v in versions:
                if v.offset is None:
                    self._place(v, pinned, over_budget_ok=True)
                v.last_used = now
            banks = [StepBank(v.name, v.layout, v.offset) for v in versions]
            state = self.pool.state
        counts = torch.tensor(num_tokens, dtype=torch.long)
        token_bank = torch.repeat_interleave(torch.tensor(seq_bank, dtype=torch.long), counts).to(self.device)
        token_factor = None
        if factors:
            token_factor = torch.repeat_interleave(torch.tensor(seq_factor, dtype=torch.long), counts).to(self.device)
        return BankStep(self.config, state, banks, token_bank, collect_stats=self.collect_stats, backend=self.backend,
                        factors=factors, token_factor=token_factor, factor_names=factor_names)

    def pool_slots_used(self) -> int:
        return self.pool.slots_used

    def max_resident(self, step_limit: int) -> int:
        """How many banks can be resident in the device pool at once (vLLM's ``max_loras``). No
        memory budget: as many as one step can run (``step_limit``, one bank per sequence); with a
        budget: how many copies of the largest loaded bank it holds (at least 1, as the pool grows
        past the budget for one step's banks)."""
        limit = step_limit if self.max_loaded is None else max(1, min(step_limit, self.max_loaded))
        if self.pool_memory_bytes is None:
            return limit
        with self._lock:
            sizes = [v.layout.nbytes for v in self._current.values() if v.layout.kind != "factor"]
        if not sizes:
            return limit
        return max(1, min(limit, self.pool_memory_bytes // max(max(sizes), 1)))

    def residency_stats(self) -> ResidencyStats:
        """A snapshot of the residency counters, with the banks in each tier now."""
        with self._lock:
            snap = self.stats.copy()
            pool = sum(1 for v in self._current.values() if self._describe(v)["tier"] == "pool")
            snap.resident = {"host": len(self._current), "pool": pool,
                             "disk": sum(1 for n in self._on_disk if n not in self._current)}
            return snap

    # -- on demand ---------------------------------------------------------------------------------

    def may_load(self, model: str) -> bool:
        """Whether ``ensure`` may load ``model``'s banks (on-demand loading on, or evicted ones)."""
        if self.on_demand:
            return True
        with self._lock:
            return all(p in self._current or p in self._on_disk for p in model.split("+"))

    async def ensure(self, model: str) -> None:
        """Make the banks ``model`` names (``a`` or ``factor+b``) loaded before a request acquires
        them. A loaded bank counts a host hit (and a use: eviction takes the least recently used
        bank, so one a request just asked for is not the next to go). One that is not counts a miss and, with
        ``on_demand`` (or when it was evicted from host memory), is loaded from ``<root>/<name>``
        (an evicted bank: from where it was loaded) on a load worker; concurrent callers await the
        same load, and the engine keeps stepping meanwhile. Raises ``BankNotOnDisk`` (404) for no
        such folder, the load's error (``BankLoadError`` 400 naming the file and the reason, 409,
        503, 504) otherwise. Names not found and loads that failed on their files are remembered
        (``negative_ttl``, or until the folder changes) and answered without touching the disk.
        Without ``on_demand`` an unknown name is left for ``acquire`` to refuse."""
        for part in model.split("+"):
            with self._lock:
                loaded = part in self._current or part in self._failed
                (self.stats.hits if loaded else self.stats.misses)["host"] += 1
                if part in self._current:  # a bank a request asks for is used now: the last to evict (LRU)
                    self._current[part].last_used = time.monotonic()
                evicted = self._on_disk.get(part)
            if loaded or not (self.on_demand or evicted is not None) or not part:
                continue
            await self._load_on_demand(part, evicted)

    async def _load_on_demand(self, name: str, evicted: dict | None) -> None:
        roots = list(self.allowed_roots)
        if not valid_on_demand_name(name):
            raise BankNotOnDisk(f"the model {name!r} does not exist: not a bank name (one folder name, "
                                "no separators or '..')")
        cached = self._misses.get(name, roots)
        if cached is not None:
            raise _fresh(cached)
        task = self._loading.get(name)
        if task is None:
            folder = Path(evicted["source"]) if evicted is not None else find_on_disk(name, roots)
            if folder is None or not folder.is_dir():
                folder = find_on_disk(name, roots) if evicted is not None else None
            if folder is None:
                err = BankNotOnDisk(f"the model {name!r} does not exist: it is not loaded and no folder of that "
                                    "name is under the bank roots")
                self._misses.put(name, err, roots)
                raise _fresh(err)
            task = asyncio.ensure_future(self._load_from(name, folder, pinned=False))
            self._loading[name] = task
            task.add_done_callback(lambda t: (self._loading.pop(name, None), t.cancelled() or t.exception()))
        await asyncio.shield(task)

    def _host_full(self, name: str) -> BankHostFull | None:
        """Why ``name`` cannot enter host memory now (None: it can, evicting if need be)."""
        with self._lock:
            try:
                if self.max_loaded is not None and sum(1 for n in self._current if n != name) >= self.max_loaded \
                        and not self._evictable(name):
                    self._make_host_room(name)  # raises BankHostFull, evicts nothing (nothing is evictable)
            except BankHostFull as exc:
                return exc
        return None

    async def _load_from(self, name: str, folder: Path, *, pinned: bool) -> None:
        """Load an on-demand bank. While host memory is full of banks that only have requests in
        flight, or every load worker is busy, wait (up to ``load_timeout``) rather than refuse."""
        deadline = time.monotonic() + (self.load_timeout or 120.0)
        while True:
            full = self._host_full(name)
            if full is not None:
                if not full.waitable or time.monotonic() >= deadline:
                    full.param = "model"
                    raise full
                await asyncio.sleep(0.02)
                continue
            try:
                return await self._load_once(name, folder, pinned=pinned)
            except (BankHostFull, BankWorkersBusy) as exc:  # room taken by other loads meanwhile, or no worker free
                if not getattr(exc, "waitable", True) or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.02)

    async def _load_once(self, name: str, folder: Path, *, pinned: bool) -> None:
        try:
            await self.load(name, folder, pinned=pinned, trigger="on_demand")
        except (BankLoadError, BankPathRefused) as exc:  # the files' fault: not retried until they change
            exc.param = "model"
            self._misses.put(name, exc, list(self.allowed_roots), folder=folder)
            raise
        except BankAdminError as exc:
            exc.param = "model"
            raise

    def _evictable(self, name: str | None = None) -> list[BankVersion]:
        """Loaded banks eviction may take out of host memory: not pinned, no request in flight on
        any of their versions (a hot-replaced bank's old version counts), not ``name``."""
        busy = {x.name for x in self._live if x.refs > 0}
        now = time.monotonic()
        return [v for n, v in self._current.items()
                if n != name and not v.pinned and n not in busy and v.held_until <= now]

    def _make_host_room(self, name: str) -> None:
        """Evict idle unpinned banks (least recently used first) until a bank ``name`` fits under
        ``max_loaded``; refuse (503) when every other loaded bank is pinned or busy."""
        if self.max_loaded is None:
            return
        while sum(1 for n in self._current if n != name) >= self.max_loaded:
            idle = self._evictable(name)
            if not idle:
                err = BankHostFull(
                    f"host memory holds {self.max_loaded} banks (--max-loaded-banks), all pinned or with requests in "
                    f"flight; bank {name!r} cannot be loaded now, retry later")
                err.waitable = any(not v.pinned for n, v in self._current.items() if n != name)
                raise err
            self._evict_host(min(idle, key=lambda x: x.last_used))

    def _evict_host(self, v: BankVersion) -> None:
        """Back to disk: forget ``v`` (its next request loads it again from its source)."""
        info = self._describe(v)
        del self._current[v.name]
        self._retire(v)
        info.update(tier="disk", resident=False, in_flight=0)
        self._on_disk.pop(v.name, None)
        self._on_disk[v.name] = info
        while len(self._on_disk) > 4096:
            self._on_disk.popitem(last=False)
        self.stats.evictions["host"] += 1
        log.info("bank %s (version %d) evicted from host memory", v.name, v.version)

    # -- residency --------------------------------------------------------------------------------

    def _retire(self, v: BankVersion) -> None:
        v.retired = True
        if v.refs == 0:
            self._drop(v)

    def _drop(self, v: BankVersion) -> None:
        if v.offset is not None:
            self.pool.free(v.offset)
            v.offset = None
        v.factor = v.host_bank = v.visual = None
        if v in self._live:
            self._live.remove(v)

    def _fits(self, packed, capacity: int) -> bool:
        return self.pool_memory_bytes is None or self.pool.bytes_with(packed, capacity) <= self.pool_memory_bytes

    def _place(self, v: BankVersion, pinned: set[int], over_budget_ok: bool) -> None:
        """Give ``v`` a slot range: a free range, else grow within the budget, else evict idle
        banks (LRU), else compact; past the budget only when ``over_budget_ok`` (a step needs it),
        otherwise ``v`` stays in host memory until a step needs it."""
        pool, packed = self.pool, v.layout.packed
        n = packed.num_slots
        compacted = False
        while True:
            off = pool.find(n)
            if off is not None and self._fits(packed, pool.capacity):
                v.offset = pool.install(packed, off)
                return
            end = pool.end()
            want = max(end + n, 2 * pool.capacity, 8)
            if self.pool_memory_bytes is not None:
                want = min(want, self.pool_memory_bytes // max(pool.bytes_with(packed, 1), 1))
            if want >= end + n and self._fits(packed, want):
                v.offset = pool.install(packed, end, want)
                return
            idle = [x for x in self._live if x.offset is not None and x.refs == 0 and id(x) not in pinned and x is not v]
            if idle:
                victim = min(idle, key=lambda x: x.last_used)
                pool.free(victim.offset)
                victim.offset = None
                self.stats.evictions["pool"] += 1
                log.info("bank %s (version %d) evicted from the device pool", victim.name, victim.version)
                continue
            if not compacted and pool.capacity - pool.slots_used >= n:  # enough slots, but in holes
                compacted = True
                resident = [x for x in self._live if x.offset is not None]
                moved = pool.compact({x.offset: x.layout.packed for x in resident})
                for x in resident:
                    x.offset = moved[x.offset]
                continue
            if not over_budget_ok:
                return
            self.over_budget = True
            log.warning("expert pool over its memory budget: the banks of one step do not fit")
            v.offset = pool.install(packed, end, end + n)
            return


def _fresh(exc: Exception) -> Exception:
    """A new exception like the cached ``exc`` (raising one instance again and again would grow
    its traceback)."""
    new = type(exc)(str(exc))
    for attr in ("status", "type", "code", "param"):
        if attr in vars(exc):
            setattr(new, attr, vars(exc)[attr])
    return new


def _pack_factor(bank: ExpertBank, model):
    from adapters.factor import load_factor_weights  # noqa: PLC0415

    try:
        return load_factor_weights(bank, model)
    except (ValueError, RuntimeError) as exc:
        raise BankLoadError(f"factor bank {bank.name!r} does not fit the model: {exc}") from None
