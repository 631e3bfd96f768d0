"""What every hub client implements, and what they share: the file listing, progress callbacks,
the one error type, and which exceptions are network failures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llmhost.errors import LlmhostError


class HubError(LlmhostError):
    pass


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None = None


class FileProgress(Protocol):
    def start(self, path: str, total: int | None, initial: int) -> None: ...
    def advance(self, path: str, n: int) -> None: ...
    def done(self, path: str, size: int) -> None: ...


class Hub(Protocol):
    name: str
    endpoint: str

    def resolve(self, repo: str, revision: str) -> tuple[str, list[RemoteFile]]:
        """The exact commit of `revision` and the repository's files at it."""
        ...

    def download(
        self, repo: str, commit: str, file: RemoteFile, dest: Path, progress: FileProgress
    ) -> Path: ...


def is_transport_error(err: Exception) -> bool:
    """Network failures of any HTTP stack the hub libraries use (httpx, httpx2, requests)."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(err).__mro__}
    module = type(err).__module__.split(".")[0]
    network = {"TransportError", "ConnectionError", "Timeout", "TimeoutException", "ChunkedEncodingError"}
    return module in ("httpx", "httpx2", "requests", "urllib3") and bool(names & network)
