"""Run the API with uvicorn; SIGTERM drains requests in flight before exiting."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from llmhost.config import is_loopback
from llmhost.errors import InvalidRequestError
from llmhost.server.manager import ModelManager
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


def serve(manager: ModelManager, settings: ServerSettings, log_level: str = "info") -> None:
    import uvicorn

    from llmhost.server.app import create_app

    app = create_app(manager, settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout) + 1,
    )
    server = _draining_server(config, app.state.api, settings.drain_timeout)
    try:
        server.run()
    finally:
        manager.close()


def _draining_server(config: Any, api: Any, grace: float) -> Any:
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
                    print(f"llmhost: serving on http://{host}:{port}", file=sys.stderr, flush=True)

    return Server(config)
