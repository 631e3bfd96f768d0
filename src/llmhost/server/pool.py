"""Many models behind one server: loaded on demand, unloaded when idle, within a memory budget.

A served *name* runs on a *unit*: one loaded engine. A fine-tuned store model (a LoRA adapter)
runs on its base's unit as an adapter, so the base and all its adapters share one copy of the
weights and decode in the same batches. The life of a request:

1. `acquire(name)` resolves the name once (a store name, a path, the embedded default) and
   finds its unit: base model, engine kind.
2. A unit that is not loaded is loaded in its own thread; first, room is made: idle units are
   unloaded, least recently used first, until the estimate fits `--memory-gib` and
   `--max-loaded`. Waiters hold a reservation, so nothing they wait for is unloaded under them.
3. An adapter is added to its loaded base on the inference thread, between two steps.
4. The lease ends with the request; a sweeper unloads units idle longer than `--keep-alive`.

The models named at start load side by side (vLLM children start together); loads in this process
take turns, so the memory each adds is its own.

Memory: the larger of an estimate before loading (weights at the load dtype, the KV cache, runtime
overhead) and what loading took (the growth of resident and CUDA memory) counts in the budget.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from llmhost.config import LoadSettings, PoolSettings
from llmhost.engine.base import Engine
from llmhost.engine.ref import ModelRef, resolve_ref
from llmhost.errors import InvalidRequestError, ModelNotFoundError
from llmhost.hardware import free_gib, give_memory_back, used_bytes
from llmhost.server.units import ModelTooLargeError, NoRoomError, Served, Unit
from llmhost.store.estimate import load_estimate_gib

log = logging.getLogger("llmhost")

#: How long a request waits for busy models to finish so that its own can load.
ROOM_WAIT_S = 120.0


class Lease:
    """A request's hold on its engine: the unit is not unloaded until `release()`."""

    def __init__(self, pool: ModelPool, unit: Unit, engine: Engine) -> None:
        self.engine = engine
        self._pool, self._unit = pool, unit
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self._unit)


class ModelPool:
    """Served names → engines, loading on first use and unloading under the budget and keep-alive."""

    def __init__(self, load: LoadSettings, settings: PoolSettings | None = None) -> None:
        self.load_settings = load
        self.settings = settings or PoolSettings()
        self._cv = threading.Condition()
        self._units: dict[str, Unit] = {}
        self._served: dict[str, Served] = {}
        self._named: list[str] = []  # names given at start, in order (listed first)
        self._aliased: dict[str, str] = {}  # alias → served name, as first answered (logged once)
        self._loading_here = threading.Lock()
        self._budget = self.settings.memory_gib
        self._closed = False
        self._sweeper = threading.Thread(target=self._sweep_loop, name="llmhost-keep-alive", daemon=True)
        self._sweeper.start()

    @property
    def budget_gib(self) -> float:
        """--memory-gib, else 90% of what was free when first asked (the first load)."""
        if self._budget is None:
            self._budget = free_gib(self.load_settings.device) * 0.9
        return self._budget

    # -- what is served ------------------------------------------------------------------

    def add_engine(self, engine: Engine) -> None:
        """Serve a ready engine (an upstream's model, or one loaded at start) for the pool's life."""
        if engine.name in self._served:
            raise InvalidRequestError(f"two models share the name {engine.name}; serve each name once")
        unit = Unit(f"ready:{engine.name}", None, engine.kind, engine, pinned=True)
        self._units[unit.key] = unit
        self._served[engine.name] = Served(engine.name, unit.key)
        self._named.append(engine.name)

    def add_named(self, *typed: str | None) -> list[str]:
        """Serve models named at start: loaded now, side by side (vLLM children start together),
        and kept loaded; the first failure is raised once every load has ended."""
        names = [self._resolve(t).name for t in typed]
        for name in names:
            if name in self._named:
                raise InvalidRequestError(f"two models share the name {name}; serve each name once")
            self._named.append(name)
        with ThreadPoolExecutor(max(1, len(names)), thread_name_prefix="llmhost-start") as start:
            loads = [start.submit(self.acquire, name, True) for name in names]
        failed = [err for err in (load.exception() for load in loads) if err is not None]
        for load in loads:
            if load.exception() is None:
                load.result().release()
        if failed:
            raise failed[0]
        return names

    @property
    def names(self) -> list[str]:
        """Every name served: those given at start, then (with --all) the store's."""
        names = list(self._named)
        if self.settings.all:
            names += [n for n in _store_names() if n not in names]
        return names

    def listing(self) -> list[dict[str, Any]]:
        """/v1/models' entries, each saying whether the model is loaded now."""
        out = []
        for name in self.names:
            served = self._served.get(name)
            unit = self._units.get(served.unit) if served else None
            loaded = unit is not None and unit.engine is not None
            if loaded and served is not None and served.adapter is not None:
                loaded = name in unit.adapters  # type: ignore[union-attr]
            out.append({"id": name, "loaded": loaded})
        return out

    def _resolve(self, typed: str | None) -> Served:
        """A name → what serves it; resolved once per name (the store is read on first use)."""
        if typed is not None and typed in self._served:
            return self._served[typed]
        ref = resolve_ref(typed)
        if ref.name in self._served:
            return self._served[ref.name]
        base = ref.base if ref.is_adapter else ref
        assert base is not None
        kind = self._kind(ref)
        key = f"{kind}:{base.key}"
        with self._cv:
            if key not in self._units:
                self._units[key] = Unit(
                    key,
                    base,
                    kind,
                    estimate_gib=load_estimate_gib(base.path, base.is_gguf, self.load_settings),
                )
            served = Served(ref.name, key, ref if ref.is_adapter else None)
            self._served[ref.name] = served
            self._units[key].for_adapters |= ref.is_adapter
        return served

    def _kind(self, ref: ModelRef) -> str:
        from llmhost.engine.loader import choose_engine

        if not ref.is_adapter:
            return choose_engine(ref, self.load_settings)
        assert ref.base is not None
        kind = choose_engine(ref.base, self.load_settings)
        return kind if kind in ADAPTER_ENGINES else "transformers"

    def served_name(self, name: str) -> str:
        """`name`, or the served name --model-alias maps it to (Claude Code asks for claude-…)."""
        if name not in self._served and name not in self._named and name not in self._aliased:
            found = self.settings.alias(name, self._named[0] if self._named else None)
            if found is not None:
                self._aliased[name] = found[0]
                log.info("model %r is not served here: %s answers it (--model-alias %s)", name, *found)
        return self._aliased.get(name, name)

    def _lookup(self, name: str) -> Served:
        """A request's model name → what serves it. Only names served are resolved: a request
        never names a path (the store is read again, so new store models are found at once)."""
        name = self.served_name(name)
        if name in self._served:  # resolved before (one that left the store still runs if loaded)
            return self._served[name]
        if not self.settings.all or name not in self.names:
            raise ModelNotFoundError(
                f"the model {name!r} does not exist here; available: {', '.join(self.names)}"
            )
        return self._resolve(name)

    # -- leases --------------------------------------------------------------------------

    def acquire(self, name: str, pin: bool = False) -> Lease:
        """The engine for `name`, loaded if need be (this call then waits for it)."""
        served = self._lookup(name)
        with self._cv:
            unit = self._units[served.unit]
            unit.pinned |= pin
            unit.reserved += 1
            future = self._start_loading(unit) if unit.engine is None else None
        try:
            if future is not None:
                future.result()
            engine = self._engine_for(unit, served)
        except BaseException:
            with self._cv:
                unit.reserved -= 1
                self._cv.notify_all()
            raise
        with self._cv:
            unit.reserved -= 1
            unit.leases += 1
            unit.last_used = time.monotonic()
        return Lease(self, unit, engine)

    async def aacquire(self, name: str) -> Lease:
        """`acquire` for asyncio: a model ready to serve is leased at once; anything else (reading
        the store for a new name, a load, adding an adapter) runs in a thread."""
        import asyncio

        name = self.served_name(name)
        served = self._served.get(name)
        if served is None:
            return await asyncio.to_thread(self.acquire, name)
        with self._cv:
            unit = self._units[served.unit]
            ready = unit.engine is not None and (served.adapter is None or served.name in unit.adapters)
            if ready:
                unit.leases += 1
                unit.last_used = time.monotonic()
                return Lease(self, unit, unit.adapters.get(served.name) or unit.engine)  # type: ignore[arg-type]
        return await asyncio.to_thread(self.acquire, name)

    def _engine_for(self, unit: Unit, served: Served) -> Engine:
        assert unit.engine is not None
        if served.adapter is None:
            return unit.engine
        with self._cv:
            view = unit.adapters.get(served.name)
        if view is not None:
            return view
        with unit.adding:
            if served.name not in unit.adapters:
                started = time.perf_counter()
                added = unit.engine.add_adapter(served.name, served.adapter.path)
                took = time.perf_counter() - started
                log.info("added adapter %s to %s in %.2f s", served.name, unit.key, took)
                with self._cv:
                    unit.adapters[served.name] = added
            return unit.adapters[served.name]

    def _release(self, unit: Unit) -> None:
        with self._cv:
            unit.leases -= 1
            unit.last_used = time.monotonic()
            self._cv.notify_all()

    # -- loading and unloading -------------------------------------------------------------

    def _start_loading(self, unit: Unit) -> Future[Engine]:
        """(Under the lock.) The unit's load, started once however many requests wait for it."""
        if unit.loading is None:
            unit.loading = Future()
            name = f"llmhost-load-{unit.key}"
            unit.thread = threading.Thread(target=self._load, args=(unit,), name=name, daemon=True)
            unit.thread.start()
        return unit.loading

    def _load(self, unit: Unit) -> None:
        assert unit.loading is not None and unit.ref is not None
        future = unit.loading
        try:
            self._make_room(unit)
            from llmhost.engine.loader import load_ref

            log.info("loading %s on %s (estimated %.2f GiB)", unit.ref.name, unit.kind, unit.estimate_gib)
            _import_runtime(unit.kind)  # its libraries' own memory is not the model's
            settings = self.load_settings.model_copy(update={"engine": unit.kind})
            if unit.kind == "vllm" and (self.settings.all or unit.for_adapters):
                # LoRA on, before the user's own --vllm-args (which come later, so they win)
                from llmhost.engine.backends.vllm import with_lora

                settings = with_lora(settings, unit.ref)
            # loads in this process take turns, so the memory each adds is its own
            with contextlib.nullcontext() if unit.kind in ("vllm", "openai") else self._loading_here:
                before, started = used_bytes(), time.perf_counter()
                engine = load_ref(unit.ref, settings)
                took = max(0, used_bytes() - before) / 2**30
            log.info(
                "loaded %s in %.1f s: estimated %.2f GiB, took %.2f GiB",
                unit.ref.name,
                time.perf_counter() - started,
                unit.estimate_gib,
                took,
            )
        except BaseException as err:
            with self._cv:
                unit.loading = None
                self._cv.notify_all()
            future.set_exception(err)
            return
        with self._cv:
            unit.engine, unit.measured_gib, unit.loading = engine, took, None
            unit.last_used = time.monotonic()
            unit.unloaded.clear()
            self._cv.notify_all()
        future.set_result(engine)
        # a vLLM child dies with the thread that started it: this thread lives as long as the engine
        unit.unloaded.wait()

    def _make_room(self, unit: Unit) -> None:
        """Unload idle units (least recently used first) until `unit` fits; wait while busy ones
        hold the room; refuse a model that could not fit even alone."""
        limit = self.settings.max_loaded
        if unit.estimate_gib > self.budget_gib:
            raise ModelTooLargeError(
                f"{unit.label} needs about {unit.estimate_gib:.2f} GiB, more than the {self.budget_gib:.2f} "
                "GiB this server may use (--memory-gib): serve a smaller model or quantization"
            )
        deadline = time.monotonic() + ROOM_WAIT_S
        with self._cv:
            while True:
                others = [u for u in self._units.values() if u is not unit and (u.engine or u.loading)]
                used = sum(u.gib for u in others)
                if used + unit.estimate_gib <= self.budget_gib and (limit is None or len(others) < limit):
                    return
                idle = [u for u in others if not u.busy and not u.pinned and u.engine is not None]
                if idle:
                    victim = min(idle, key=lambda u: u.last_used)
                    self._unload(victim, "to make room")
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoRoomError(
                        f"no room to load {unit.label} ({unit.estimate_gib:.2f} GiB): the loaded models "
                        f"use {used:.2f} of {self.budget_gib:.2f} GiB and are busy; retry shortly"
                    )
                self._cv.wait(min(left, 1.0))

    def _unload(self, unit: Unit, why: str) -> None:
        """(Under the lock.) Close the unit's engine and give its memory back."""
        engine, unit.engine = unit.engine, None
        adapters, unit.adapters = unit.adapters, {}
        unit.measured_gib = None
        idle = time.monotonic() - unit.last_used
        log.info("unloading %s (%s; idle %.0f s)", unit.label, why, idle)
        del adapters  # views of the engine: closing it removes them all
        if engine is not None:
            engine.close()
            del engine
        unit.unloaded.set()
        give_memory_back()
        self._cv.notify_all()

    def _sweep_loop(self) -> None:
        while True:
            keep = self.settings.keep_alive_s
            with self._cv:
                self._cv.wait(timeout=1.0 if keep is None else min(1.0, max(keep / 4, 0.05)))
                if self._closed:
                    return
                if keep is None:
                    continue
                now = time.monotonic()
                for unit in list(self._units.values()):
                    if unit.engine and not unit.pinned and not unit.busy and now - unit.last_used >= keep:
                        self._unload(unit, f"idle longer than --keep-alive {self.settings.keep_alive}")

    # -- what `/health`, `/metrics` and `llmhost ps` read ---------------------------------------

    def loaded(self) -> list[Unit]:
        return [u for u in self._units.values() if u.engine is not None]

    def ps(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        rows = []
        for unit in self.loaded():
            assert unit.engine is not None
            names = [s.name for s in self._served.values() if s.unit == unit.key and s.adapter is None]
            rows.append(
                {
                    "name": names[0] if names else (unit.label),
                    "engine": unit.kind,
                    **unit.engine.facts(),
                    "adapters": sorted(unit.adapters),
                    "memory_gib": round(unit.gib, 3),
                    "estimated_gib": round(unit.estimate_gib, 3),
                    "measured_gib": None if unit.measured_gib is None else round(unit.measured_gib, 3),
                    "running": unit.engine.running,
                    "queued": unit.engine.queued,
                    "leases": unit.leases,
                    "idle_s": 0.0 if unit.leases else round(now - unit.last_used, 1),
                    "pinned": unit.pinned,
                    "expires_in_s": self._expires_in(unit, now),
                }
            )
        return rows

    def _expires_in(self, unit: Unit, now: float) -> float | None:
        keep = self.settings.keep_alive_s
        if unit.pinned or keep is None or unit.leases:
            return None
        return round(max(0.0, keep - (now - unit.last_used)), 1)

    def queued(self) -> int:
        return sum(u.engine.queued for u in self.loaded() if u.engine)

    def running(self) -> int:
        return sum(u.engine.running for u in self.loaded() if u.engine)

    def kinds(self) -> dict[str, str]:
        return {name: self._units[s.unit].kind for name, s in self._served.items()}

    def problems(self) -> dict[str, str]:
        out = {}
        for unit in self.loaded():
            assert unit.engine is not None
            if unit.engine.problem is not None:
                out[unit.engine.name] = unit.engine.problem
        return out

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for unit in self.loaded():
                self._unload(unit, "the server stops")
            self._cv.notify_all()
        # their threads end now; one still ending while the interpreter finalizes (torch's
        # thread-local state) aborts the process
        for unit in list(self._units.values()):
            if unit.thread is not None:
                unit.thread.join(timeout=10)


#: Engines that serve LoRA adapters per request on a loaded base (others: adapters go to a
#: transformers copy of the base).
ADAPTER_ENGINES = frozenset({"transformers", "llamacpp", "vllm"})


def _store_names() -> list[str]:
    from llmhost.store.embedded import DEFAULT_MODEL_NAME
    from llmhost.store.local import Store

    return [DEFAULT_MODEL_NAME, *sorted(m.name for m in Store().list())]


def _import_runtime(kind: str) -> None:
    """Import what an engine runs on, so that measuring a load counts the model, not libraries
    the process loads once (torch and transformers are ≈0.3 GiB of resident memory)."""
    import importlib

    for name in {"transformers": ("torch", "transformers"), "llamacpp": ("torch", "llama_cpp")}.get(kind, ()):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    if kind == "transformers":
        with contextlib.suppress(ImportError):
            from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - lazy modules
