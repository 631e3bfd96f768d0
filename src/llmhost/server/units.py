"""What the pool (pool.py) keeps per loaded engine and per served name, and its two refusals."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from llmhost.engine.base import Engine
from llmhost.engine.ref import ModelRef
from llmhost.errors import InvalidRequestError, LlmhostError


class ModelTooLargeError(InvalidRequestError):
    """The model cannot be loaded even with every other model unloaded."""

    code = "model_too_large"


class NoRoomError(LlmhostError):
    """Every loaded model is busy and together they leave no room: retry shortly."""

    status = 503
    kind = "server_busy"


@dataclass(eq=False)
class Unit:
    """One loaded (or loadable) engine: a base model on one engine kind, with its adapters."""

    key: str
    ref: ModelRef | None
    kind: str
    engine: Engine | None = None
    estimate_gib: float = 0.0
    measured_gib: float | None = None
    pinned: bool = False
    leases: int = 0
    #: Requests waiting for this unit to load: it is not unloaded under them.
    reserved: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loading: Future[Engine] | None = None
    #: Served name → the adapter's engine view on this unit.
    adapters: dict[str, Engine] = field(default_factory=dict)
    #: Whether a served name is an adapter on this unit (vLLM then starts with LoRA enabled).
    for_adapters: bool = False
    #: Set when the unit is unloaded: its loading thread lives until then (see `_load`).
    unloaded: threading.Event = field(default_factory=threading.Event)
    #: The thread that loaded it (and lives while it is loaded).
    thread: threading.Thread | None = None
    #: One adapter added at a time (two first requests for it must not add it twice).
    adding: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        return self.ref.name if self.ref is not None else self.key

    @property
    def gib(self) -> float:
        return max(self.estimate_gib, self.measured_gib or 0.0)

    @property
    def busy(self) -> bool:
        return self.leases > 0 or self.reserved > 0 or self.loading is not None


@dataclass(frozen=True)
class Served:
    """A name the server answers to: its unit and, for a fine-tuned model, its adapter."""

    name: str
    unit: str
    adapter: ModelRef | None = None
