"""`llmhost web`: start a private `llmhost serve` (unless --server is given), then the Streamlit
page as a child process; stop both when either ends or on Ctrl-C / SIGTERM.

Both children end with the launcher, even a SIGKILLed one: PR_SET_PDEATHSIG (SIGKILL) on Linux,
elsewhere each watches the launcher's pid (`portable.child_options`, `portable.watch_parent`);
conversations are safe in SQLite transactions either way.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import webbrowser
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic_settings import BaseSettings

from llmhost.config import LoadSettings, PoolSettings, is_loopback, llmhost_home
from llmhost.errors import InvalidRequestError
from llmhost.procs import Child, free_port, wait_http
from llmhost.web.settings import WebSettings

APP = Path(__file__).with_name("app.py")
READY_TIMEOUT = 600.0  # a first start converts the embedded GGUF; a big model loads for minutes


def load_env(*settings: BaseSettings) -> dict[str, str]:
    """The flags the user gave, as the `LLMHOST_*` variables `llmhost serve` reads."""
    env = {}
    for given in settings:
        for name in given.model_fields_set:
            value = getattr(given, name)
            env[f"LLMHOST_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


@contextlib.contextmanager
def private_server(
    model: str | None, load: LoadSettings, pool: PoolSettings, say: Callable[[str], None]
) -> Iterator[tuple[str, str]]:
    """`llmhost serve MODEL` on a free loopback port with a random key; yields (base_url, key).
    With --all the page offers every store model too, MODEL (or the default) loaded first."""
    key = secrets.token_urlsafe(24)  # other local users cannot use this private server
    env = {**os.environ, **load_env(load, pool), "LLMHOST_API_KEY": key, "LLMHOST_DRAIN_TIMEOUT": "2"}
    env.pop("LLMHOST_API_KEY_FILE", None)
    cmd = [sys.executable, "-u", "-m", "llmhost", "serve", "--host", "127.0.0.1", "--port", "0"]
    cmd += [model or "default"] if model or pool.all else []
    child = Child("model server", cmd, env, llmhost_home() / "web" / "server.log")
    try:
        say(f"Loading {model or 'the embedded default model'}…")
        url = child.wait_for_line(r"llmhost: serving on (http://\S+)", READY_TIMEOUT).group(1)
        wait_http(url + "/health", 30, child)
        yield url + "/v1", key
    finally:
        child.stop()


def check_exposure(web: WebSettings) -> None:
    if not is_loopback(web.host) and not web.insecure_no_auth:
        raise InvalidRequestError(
            f"binding {web.host} puts the chat page on the network with no login: anyone who reaches "
            "it can use the model. Keep the default 127.0.0.1, or pass --insecure-no-auth if you mean it"
        )


def _check_database(path: Path) -> None:
    """Open the conversation database here, so a bad --db is one line, not a broken page."""
    import sqlite3

    from llmhost.web.history import ConversationStore

    try:
        ConversationStore(path)
    except (OSError, sqlite3.Error) as err:
        raise InvalidRequestError(
            f"cannot open the conversation database {path}: {err}; pick another --db"
        ) from None


def run(
    model: str | None, load: LoadSettings, pool: PoolSettings, web: WebSettings, say: Callable[[str], None]
) -> int:
    """Returns the page's exit status."""
    check_exposure(web)
    _check_database(web.db_path())
    if web.server and model:
        raise InvalidRequestError(
            "give either MODEL (served here) or --server URL (served elsewhere), not both"
        )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below
    with contextlib.ExitStack() as stack:
        if web.server:
            base_url, key = web.server, web.api_key or ""
        else:
            base_url, key = stack.enter_context(private_server(model, load, pool, say))
        page, url = stack.enter_context(_page(web, base_url, key))
        say(f"llmhost web: open {url} in your browser  (Ctrl-C stops)")
        if web.open_browser:
            with contextlib.suppress(Exception):
                webbrowser.open(url)
        return page.proc.wait()


@contextlib.contextmanager
def _page(web: WebSettings, base_url: str, key: str) -> Iterator[tuple[Child, str]]:
    port = web.port or free_port(web.host)
    # a wildcard bind is reached through loopback from here
    url = f"http://{'127.0.0.1' if web.host in ('0.0.0.0', '::') else web.host}:{port}"
    env = {
        **os.environ,
        "LLMHOST_WEB_SERVER": base_url,
        "LLMHOST_WEB_API_KEY": key,
        "LLMHOST_WEB_DB": str(web.db_path()),
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }
    cmd = [
        sys.executable, "-m", "llmhost.web.page_process", "run", str(APP),
        "--server.address", web.host,
        "--server.port", str(port),
        "--server.headless", "true",  # we open the browser ourselves, once the page answers
        "--server.fileWatcherType", "none",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal",
    ]  # fmt: skip
    child = Child("web page", cmd, env, llmhost_home() / "web" / "page.log")
    try:
        wait_http(url + "/_stcore/health", 60, child)
        yield child, url
    finally:
        child.stop()
