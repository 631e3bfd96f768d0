"""The real thing: `llmhost web` on the embedded model, driven in headless Chromium.

`make test` installs Debian's chromium; elsewhere the test is skipped unless
LLMHOST_REQUIRE_BROWSER=1 (set by CI), which turns a missing browser into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import psutil
import pytest

from conftest import words
from llmhost.web.history import ConversationStore
from servers import WebProcess, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("LLMHOST_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # this machine's closed network refuses them anyway
    "--disable-component-update",
    "--disable-sync",
]


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return "Debian's chromium is not installed (`make test` installs it)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (it is in the [test] extra)"
    return None


missing = _browser_missing()
if missing and os.environ.get("LLMHOST_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"browser test required but {missing}")
pytestmark = pytest.mark.skipif(bool(missing), reason=missing or "")


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path):
    db = tmp_path_factory.mktemp("web") / "conversations.db"
    store = ConversationStore(db)  # an earlier conversation with markup the page must not obey
    conv = store.create(title="markup")
    store.add(conv.id, "user", "show me markup")
    store.add(
        conv.id, "assistant", "<b>not bold</b> <img src=x onerror=alert(1)>\n\n```python\nprint(1)\n```"
    )
    proc = WebProcess(db)
    proc.db = db  # type: ignore[attr-defined]
    yield proc
    if proc.proc.poll() is None:
        proc.proc.kill()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """Opens the page in a new browser context (its own session and locale); closed afterwards."""
    contexts = []

    def open_(url: str, locale: str = "en-US", greedy: bool = False):
        context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.goto(url)
        page.get_by_test_id("stChatInputTextArea").wait_for(timeout=60_000)
        _idle(page)
        if greedy:  # temperature 0 through the slider, with the keyboard as a user would
            page.get_by_role("slider", name="Temperature").focus()
            page.keyboard.press("Home")
            page.wait_for_function(
                "() => document.querySelector('input[aria-label=Temperature]').value === '0'"
            )
        return page

    yield open_
    for context in contexts:
        context.close()


def _idle(page) -> None:
    """Wait until the page's script run (after a click or a slider change) is over."""
    page.wait_for_timeout(100)  # let a run that was just requested start
    page.locator("[data-testid=stApp][data-test-script-state=notRunning]").wait_for(timeout=60_000)


def _new_chat(page) -> None:
    page.get_by_role("button", name="New chat").click()
    page.get_by_text("Ask a question to start.").wait_for()
    _idle(page)


def _ask(page, text: str) -> None:
    page.get_by_test_id("stChatInputTextArea").fill(text)
    page.keyboard.press("Enter")


def test_markup_from_the_model_is_shown_as_text(web: WebProcess, open_page) -> None:
    page = open_page(web.url)
    reply = page.get_by_test_id("stChatMessage").nth(1)
    reply.get_by_text("not bold").wait_for()
    assert "<b>not bold</b>" in reply.inner_text()
    assert reply.locator("b").count() == 0 and reply.locator("img").count() == 0
    assert reply.locator("code").first.inner_text().strip() == "print(1)"  # code blocks render


def test_ask_stream_and_see_stats(web: WebProcess, open_page, embedded_says) -> None:
    page = open_page(web.url, greedy=True)
    _new_chat(page)
    _ask(page, "What is the capital of France?")
    stats = page.get_by_text(re.compile(r"\d+ tokens · first token [\d.]+ s · [\d.]+ tokens/s"))
    stats.wait_for(timeout=120_000)
    messages = page.get_by_test_id("stChatMessage")
    assert messages.count() == 2
    assert embedded_says("What is the capital of France?") in words(messages.nth(1).inner_text())
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)

    page.reload()  # a refresh keeps the conversation (its id is in the URL)
    page.get_by_text("What is the capital of France?").first.wait_for()
    assert page.get_by_test_id("stChatMessage").count() == 2


def test_stop_keeps_the_partial_reply(web: WebProcess, open_page) -> None:
    page = open_page(web.url, greedy=True)  # greedy: this story runs for 512 tokens
    _new_chat(page)
    _ask(page, "Write a long story about a dragon who learns to cook.")
    reply = page.get_by_test_id("stChatMessage").nth(1)
    reply.wait_for(timeout=60_000)
    page.wait_for_function(  # some words have streamed in
        "() => (document.querySelectorAll('[data-testid=stChatMessage]')[1]?.innerText || '').length > 40",
        timeout=60_000,
    )
    page.get_by_test_id("stChatInputStopButton").click()
    page.get_by_test_id("stChatInputStopButton").wait_for(state="detached", timeout=30_000)
    store = ConversationStore(web.db)  # type: ignore[attr-defined]
    conv = store.list()[0]

    def reply_saved() -> bool:  # the run ends at the next token it receives, then saves
        return store.messages(conv.id)[-1].role == "assistant"

    assert wait_for(reply_saved, timeout=30)
    page.reload()
    page.get_by_text("stopped").wait_for(timeout=30_000)
    reply_meta = store.messages(conv.id)[-1].meta
    assert reply_meta["stopped"] is True and 5 < reply_meta["completion_tokens"] < 512


#: Collects, in the page, when the reply's text changes (ms, its length) until the stats line shows.
WATCH_REPLY = """() => {
    window.__changes = [];
    const reply = () => document.querySelectorAll('[data-testid=stChatMessage]')[1];
    new MutationObserver(() => {
        const el = reply();
        if (!el || el.innerText.includes('tokens/s')) return;
        const n = el.innerText.trim().length, last = window.__changes.at(-1);
        if (n > 0 && (!last || last[1] !== n)) window.__changes.push([performance.now(), n]);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_the_page_shows_the_reply_as_fast_as_it_streams_in(web: WebProcess, open_page) -> None:
    """The browser shows the growing reply at ≥ 0.9× the rate the page receives it (redrawn at
    most every 50 ms, not on every token): measured in Chromium, from the first visible text to
    the last, against the tokens/s the page reports."""
    page = open_page(web.url, greedy=True)
    _new_chat(page)
    page.get_by_role("slider", name="Max new tokens").focus()
    page.keyboard.press("Home")  # 16, then steps of 16: 160 tokens
    for _ in range(9):
        page.keyboard.press("ArrowRight")
    _idle(page)
    page.evaluate(WATCH_REPLY)
    _ask(page, "Write a long story about a dragon who learns to cook.")
    stats = page.get_by_text(re.compile(r"(\d+) tokens · first token [\d.]+ s · ([\d.]+) tokens/s"))
    stats.wait_for(timeout=120_000)
    tokens, served = re.search(
        r"(\d+) tokens · first token [\d.]+ s · ([\d.]+) tokens/s", stats.inner_text()
    ).groups()
    changes = page.evaluate("window.__changes")
    assert int(tokens) == 160 and len(changes) > 10, changes
    shown = (int(tokens) - 1) / ((changes[-1][0] - changes[0][0]) / 1000)
    print(f"page shows {shown:.1f} tokens/s of {served} served ({len(changes)} redraws)")
    assert shown >= 0.9 * float(served), (shown, served, len(changes))


def test_chinese_browser_gets_chinese_ui(web: WebProcess, open_page) -> None:
    page = open_page(web.url, locale="zh-CN")
    page.get_by_role("heading", name="llmhost 聊天").wait_for()
    assert page.get_by_role("button", name="新对话").count() == 1


def test_sigterm_stops_the_page_and_its_server(web: WebProcess) -> None:
    children = psutil.Process(web.proc.pid).children(recursive=True)
    cmdlines = [" ".join(c.cmdline()) for c in children]
    assert any("llmhost.web.page_process run" in c for c in cmdlines) and any(
        " serve " in c for c in cmdlines
    ), cmdlines
    web.proc.send_signal(signal.SIGTERM)
    web.proc.wait(30)
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.cmdline() for p in alive]


def test_a_killed_launcher_leaves_no_page_or_server_behind(
    tmp_path: Path, open_page, embedded_dir: Path
) -> None:
    """SIGKILL: no clean-up runs in the launcher; the children must still go (a page that was in
    use once survived a SIGTERM death signal because its output pipe was broken)."""
    web = WebProcess(tmp_path / "c.db")
    page = open_page(web.url)  # a live browser session on the page
    _ask(page, "Hi")
    children = psutil.Process(web.proc.pid).children(recursive=True)
    assert len(children) >= 2, [c.cmdline() for c in children]
    web.proc.kill()
    web.proc.wait(10)

    def all_gone() -> bool:
        return not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)

    assert wait_for(all_gone, timeout=20), [c.cmdline() for c in children if c.is_running()]
