"""The models a server holds, by name."""

from __future__ import annotations

from llmhost.engine.base import Engine
from llmhost.errors import ModelNotFoundError


class ModelManager:
    def __init__(self, engines: list[Engine]) -> None:
        self._engines = {e.name: e for e in engines}
        self.created = {name: 0 for name in self._engines}

    @property
    def names(self) -> list[str]:
        return list(self._engines)

    def get(self, name: str) -> Engine:
        try:
            return self._engines[name]
        except KeyError:
            raise ModelNotFoundError(
                f"the model {name!r} does not exist here; available: {', '.join(self._engines)}"
            ) from None

    def queued(self) -> int:
        return sum(getattr(e, "queued", 0) for e in self._engines.values())

    def running(self) -> int:
        return sum(getattr(e, "running", 0) for e in self._engines.values())

    def kinds(self) -> dict[str, str]:
        return {name: e.kind for name, e in self._engines.items()}

    def problems(self) -> dict[str, str]:
        return {name: e.problem for name, e in self._engines.items() if e.problem is not None}

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
