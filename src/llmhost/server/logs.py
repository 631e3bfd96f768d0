"""How `llmhost serve` logs: uvicorn's own set-up, with its access log written in batches."""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any, TextIO


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler whose lines go out from a thread of its own, all those waiting in one
    write, at most `every` seconds after they were logged (and at exit). A write per line is a
    system call on the event loop and a wake-up of whatever reads the log (a terminal, journald,
    a pipe) for every request; batched, a few a second."""

    def __init__(self, stream: TextIO | None = None, every: float = 0.1) -> None:
        super().__init__(stream)
        self.every = every
        self._lines: list[str] = []
        self._writing = threading.Lock()  # lines go out in the order they came
        self._due = threading.Event()
        self._closed = False
        threading.Thread(target=self._write_loop, name="llmhost-log", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:  # logging calls it under self.lock
        try:
            self._lines.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        self._due.set()

    def flush(self) -> None:
        with self._writing:
            with self.lock:  # type: ignore[union-attr]
                lines, self._lines = self._lines, []
                self._due.clear()
            if not lines:
                return
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):  # the reader went away, or the stream was closed
                pass

    def close(self) -> None:
        self._closed = True
        self._due.set()
        self.flush()
        super().close()

    def _write_loop(self) -> None:
        while not self._closed:
            self._due.wait()
            time.sleep(self.every)  # the lines logged meanwhile go out in the same write
            self.flush()


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's own logging set-up, its access lines (one per request) batched."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["class"] = f"{__name__}.{BatchedStreamHandler.__name__}"
    return config
