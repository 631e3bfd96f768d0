"""Run the API with uvicorn; SIGTERM drains requests in flight before exiting."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from llmhost import portable
from llmhost.config import LoadSettings, PoolSettings, is_loopback, llmhost_home
from llmhost.errors import InvalidRequestError
from llmhost.server.pool import ModelPool
from llmhost.server.settings import ServerSettings


def check_exposure(settings: ServerSettings) -> str | None:
    """Refuse an open, unauthenticated server unless asked for; returns a warning to print."""
    if is_loopback(settings.host) or settings.api_keys():
        return None
    if not settings.insecure_no_auth:
        raise InvalidRequestError(
            f"binding {settings.host} exposes the API to the network without an API key: "
            "pass --api-key KEY (or --api-key-file F), or --insecure-no-auth if you really mean it"
        )
    return f"warning: serving on {settings.host} with no API key: anyone who can reach it can use it"


def open_pool(
    models: list[str] | None,
    load: LoadSettings,
    settings: PoolSettings,
    loading: Callable[[str | None], AbstractContextManager[Any]] = lambda _: contextlib.nullcontext(),
) -> ModelPool:
    """The pool `llmhost serve [MODEL]...` serves: the models named, loaded now and kept loaded
    (the embedded default if none, and no --all); with an upstream, its models (all of them if
    none is named). `loading(name)` wraps each load (the CLI shows a spinner)."""
    from llmhost.engine import load as load_engine
    from llmhost.engine.loader import uses_upstream

    pool = ModelPool(load, settings)
    try:
        if uses_upstream(load):
            if not models:
                from llmhost.engine.backends.openai import available

                models = available(load.upstream, load.upstream_key) if load.upstream else []
            for name in models:
                with loading(name):
                    pool.add_engine(load_engine(name, load))
        else:
            names = models or ([] if settings.all else [None])
            if names:
                with loading(names[0] if len(names) == 1 else ", ".join(str(n) for n in names)):
                    pool.add_named(*names)
    except BaseException:
        pool.close()
        raise
    return pool


class BackgroundServer:
    """The API served by uvicorn on a thread of this process, on `settings`' host and port (0: a
    free one), ready once constructed: for programs that embed llmhost, and the tests. `stop()`
    ends it and closes the pool. (Signals and draining are the `serve()` process's.)"""

    def __init__(self, pool: ModelPool, settings: ServerSettings, log_level: str = "warning") -> None:
        import uvicorn

        from llmhost.server.app import create_app

        self.pool = pool
        self.app = create_app(pool, settings)
        config = uvicorn.Config(self.app, host=settings.host, port=settings.port, log_level=log_level)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="llmhost-api", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                pool.close()
                raise InvalidRequestError(f"could not serve on {settings.host}:{settings.port}")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.pool.close()


def serve(pool: ModelPool, settings: ServerSettings, log_level: str = "info") -> None:
    import uvicorn

    from llmhost.server.app import create_app
    from llmhost.server.logs import uvicorn_log_config

    app = create_app(pool, settings)
    # http and loop left to uvicorn: httptools and uvloop (dependencies; uvloop not on Windows)
    # where installed, which take about a third less of the event loop's CPU per request
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=uvicorn_log_config(),
        timeout_graceful_shutdown=int(settings.drain_timeout) + 1,
    )
    registry = Registry()
    server = _draining_server(config, app.state.api, settings.drain_timeout, registry)
    try:
        server.run()
    finally:
        registry.remove()
        pool.close()


def _draining_server(config: Any, api: Any, grace: float, registry: Registry) -> Any:
    """A uvicorn.Server whose first SIGTERM/SIGINT stops taking requests (503) and exits once the
    requests in flight are done or the grace period ends; a second signal exits at once.
    (Defined here so that uvicorn is imported only when serving.)"""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if api.draining:
                return super().handle_exit(sig, frame)
            api.draining = True
            print(
                f"llmhost: draining {api.in_flight} request(s), up to {grace:g} s",
                file=sys.stderr,
                flush=True,
            )
            threading.Thread(target=self._drain, daemon=True).start()

        def _drain(self) -> None:
            deadline = time.monotonic() + grace
            while api.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            self.should_exit = True

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    url = f"http://{host}:{port}"
                    print(f"llmhost: serving on {url}", file=sys.stderr, flush=True)
                    registry.add(url)

    return Server(config)


class Registry:
    """This server's entry in LLMHOST_HOME/run (its pid and URL), for `llmhost ps` to find it."""

    def __init__(self) -> None:
        self.file = run_folder() / f"{os.getpid()}.json"
        self.urls: list[str] = []

    def add(self, url: str) -> None:
        self.urls.append(url)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "urls": self.urls, "started": time.time()}
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        portable.replace(tmp, self.file)

    def remove(self) -> None:
        self.file.unlink(missing_ok=True)


def run_folder() -> Path:
    return llmhost_home() / "run"


def running_servers() -> list[dict[str, Any]]:
    """The servers started from this LLMHOST_HOME that are still running (stale entries of
    killed servers are removed)."""
    import psutil

    found = []
    for file in sorted(run_folder().glob("*.json")):
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
            alive = psutil.pid_exists(int(record["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            alive = False
            record = None
        if alive and record is not None:
            found.append(record)
        else:
            file.unlink(missing_ok=True)
    return found
