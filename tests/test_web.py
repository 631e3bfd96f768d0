"""The chat page's logic through Streamlit's AppTest, against a real `llmhost serve` subprocess.

A recording proxy sits between the page and the server, so the tests check what the page really
sends over HTTP (through the official openai client), not what it meant to send.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import words
from llmhost.web.history import ConversationStore
from servers import LocalServer, RecordingProxy

APP = Path(__file__).parents[1] / "src" / "llmhost" / "web" / "app.py"
KEY = "web-test-key"


@pytest.fixture(scope="module")
def server(embedded_dir: Path, tiny_dir: Path):
    proc = LocalServer("--api-key", KEY, "--max-concurrency", "2", str(tiny_dir), "default")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def proxy(server: LocalServer):
    proxy = RecordingProxy(server.url)
    yield proxy
    proxy.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "conversations.db"


@pytest.fixture
def page(proxy: RecordingProxy, db: Path, monkeypatch: pytest.MonkeyPatch, tiny_dir: Path):
    """A fresh browser session on the page, talking to the tiny model (fast) at temperature 0."""

    def open_page(key: str = KEY, url: str | None = None, model: str | None = tiny_dir.name) -> AppTest:
        monkeypatch.setenv("LLMHOST_WEB_SERVER", url or proxy.url + "/v1")
        monkeypatch.setenv("LLMHOST_WEB_API_KEY", key)
        monkeypatch.setenv("LLMHOST_WEB_DB", str(db))
        at = AppTest.from_file(str(APP), default_timeout=180).run()
        if model and at.selectbox(key="model").options:
            at.selectbox(key="model").set_value(model)
        at.slider(key="temperature").set_value(0.0)
        at.slider(key="max_tokens").set_value(32)
        return at.run()

    return open_page


def send(at: AppTest, text: str) -> AppTest:
    at.chat_input(key="prompt").set_value(text)
    return at.run()


def chat(at: AppTest) -> list[tuple[str, str]]:
    return [(m.name, m.markdown[0].value) for m in at.chat_message]


def test_a_message_gets_a_streamed_reply_with_stats(page, proxy: RecordingProxy, embedded_says) -> None:
    at = page(model="smollm2-135m-instruct")
    at = send(at, "What is the capital of France?")
    assert not at.exception, at.exception
    (role_q, question), (role_a, answer) = chat(at)
    assert (role_q, question, role_a) == ("user", "What is the capital of France?", "assistant")
    assert embedded_says("What is the capital of France?") in words(answer)
    body = proxy.chat_bodies()[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    stats = at.chat_message[1].caption[-1].value
    assert "tokens" in stats and "tokens/s" in stats and "first token" in stats
    assert at.button(key="regenerate_button").label == "Regenerate"


def test_each_sidebar_control_changes_the_request(page, proxy: RecordingProxy, tiny_dir: Path) -> None:
    at = page(model="smollm2-135m-instruct")
    send(at, "hello")
    base = proxy.chat_bodies()[-1]
    changes = [
        (lambda: at.selectbox(key="model").set_value(tiny_dir.name), "model", tiny_dir.name),
        (lambda: at.text_area(key=f"system-{at.session_state['conv_id']}").input("Be brief."), None, None),
        (lambda: at.slider(key="max_tokens").set_value(48), "max_tokens", 48),
        (lambda: at.slider(key="temperature").set_value(1.25), "temperature", 1.25),
        (lambda: at.slider(key="top_p").set_value(0.5), "top_p", 0.5),
    ]
    previous = base
    for change, field, value in changes:
        change()
        send(at, "hello again")
        body = proxy.chat_bodies()[-1]
        if field is None:  # the system prompt leads the messages
            assert body["messages"][0] == {"role": "system", "content": "Be brief."}
            assert previous["messages"][0]["role"] == "user"
        else:
            assert body[field] == value and previous[field] != value, field
        previous = body
    assert not at.exception


def test_regenerate_replaces_the_last_reply(page, proxy: RecordingProxy, db: Path) -> None:
    at = page()
    at.slider(key="temperature").set_value(1.5)
    send(at, "Tell me something.")
    store = ConversationStore(db)
    conv = at.session_state["conv_id"]
    first = store.messages(conv)
    sent = len(proxy.chat_bodies())
    at.button(key="regenerate_button").click()
    at.run()
    second = store.messages(conv)
    assert len(proxy.chat_bodies()) == sent + 1
    assert [m.role for m in second] == ["user", "assistant"]
    assert second[0] == first[0] and second[1].id != first[1].id
    # the regenerated request carries the same conversation, without the replaced reply
    assert proxy.chat_bodies()[-1]["messages"] == [{"role": "user", "content": "Tell me something."}]
    assert len(at.chat_message) == 2


def test_conversations_survive_a_new_session(page, db: Path) -> None:
    at = page()
    send(at, "first conversation")
    first = at.session_state["conv_id"]
    at.button(key="new_chat").click().run()
    assert not at.chat_message
    send(at, "second conversation")
    second = at.session_state["conv_id"]
    assert first != second

    again = page()  # a new browser session, as after a refresh or a restart
    assert again.session_state["conv_id"] == second  # the most recent one opens
    assert chat(again)[0] == ("user", "second conversation")
    assert again.button(key=f"conv-{first}").label == "first conversation"
    again.button(key=f"conv-{first}").click().run()
    assert chat(again)[0] == ("user", "first conversation")

    again.text_input(key=f"rename-{first}").input("Renamed").run()
    assert again.button(key=f"conv-{first}").label == "Renamed"
    again.button(key="delete").click().run()
    assert [c.id for c in ConversationStore(db).list()] == [second]
    assert again.session_state["conv_id"] == second


def test_a_url_names_the_conversation(page, db: Path, proxy: RecordingProxy, monkeypatch) -> None:
    store = ConversationStore(db)
    old = store.create(title="old one")
    store.add(old.id, "user", "kept question")
    store.create(title="newer, empty")
    monkeypatch.setenv("LLMHOST_WEB_SERVER", proxy.url + "/v1")
    monkeypatch.setenv("LLMHOST_WEB_API_KEY", KEY)
    monkeypatch.setenv("LLMHOST_WEB_DB", str(db))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["c"] = old.id
    at.run()
    assert chat(at) == [("user", "kept question")]
    assert at.button(key="regenerate_button").label == "Retry"  # no reply yet


def test_unreachable_server_shows_an_inline_error_and_keeps_the_message(page, db: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    at = page(url=f"http://127.0.0.1:{port}/v1", model=None)
    assert "Cannot reach the model server" in at.sidebar.error[0].value
    send(at, "are you there?")
    assert chat(at) == [("user", "are you there?")]
    assert "Cannot reach the model server" in at.error[-1].value
    assert at.button(key="regenerate_button").label == "Retry"
    conv = at.session_state["conv_id"]
    assert [m.content for m in ConversationStore(db).messages(conv)] == ["are you there?"]


def test_bad_key_is_explained(page) -> None:
    at = page(key="wrong-key", model=None)
    assert "refused the API key" in at.sidebar.error[0].value
    send(at, "hi")
    assert "refused the API key" in at.error[-1].value


def test_context_overflow_and_dropped_turns_are_shown(page, proxy: RecordingProxy) -> None:
    at = page()
    at.slider(key="max_tokens").set_value(4096)  # more than the tiny model's 1024-token window
    send(at, "hi")
    assert "too long for the model's context window" in at.error[-1].value
    at.slider(key="max_tokens").set_value(496)
    at.slider(key="temperature").set_value(1.0)
    notes: list[str] = []
    for i in range(4):  # ~500-token random replies soon overflow the window
        send(at, f"question {i}")
        notes = [c.value for c in at.caption if "older message(s) were left out" in c.value]
        if notes:
            break
    assert proxy.chat_bodies()[-1]["truncate_history"] is True
    assert notes, [c.value for c in at.caption]


def test_chinese_ui(page) -> None:
    at = page()
    at.selectbox(key="lang_choice").set_value("zh").run()
    assert at.title[0].value == "llmhost 聊天"
    assert at.button(key="new_chat").label == "新对话"
    send(at, "你好")
    assert chat(at)[0] == ("user", "你好")
    assert "tokens/秒" in at.chat_message[1].caption[-1].value


def test_model_output_is_never_raw_html(page, db: Path) -> None:
    store = ConversationStore(db)
    conv = store.create()
    store.add(conv.id, "user", "<b>q</b>")
    store.add(conv.id, "assistant", "<script>alert(1)</script>\n\n```python\nprint(1)\n```")
    at = page()
    assert all(not md.allow_html for m in at.chat_message for md in m.markdown)


def test_exports(db: Path) -> None:
    from llmhost.web.history import to_json, to_markdown

    store = ConversationStore(db)
    conv = store.create(system="Be kind.")
    store.add(conv.id, "user", "你好 there")
    store.add(conv.id, "assistant", "Hello!\n\n```py\nx = 1\n```")
    conv = store.get(conv.id)
    doc = json.loads(to_json(conv, store.messages(conv.id)))
    assert doc["title"] == "你好 there"
    assert doc["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "你好 there"},
        {"role": "assistant", "content": "Hello!\n\n```py\nx = 1\n```"},
    ]
    md = to_markdown(conv, store.messages(conv.id))
    assert md.startswith("# 你好 there") and "## Assistant\n\nHello!" in md and "```py" in md


def test_reasoning_is_folded_away_above_the_answer(page, tmp_path: Path) -> None:
    """A thinking model's reasoning (here the embedded model under a template that opens a
    `<think>` block) is shown in a folded expander, apart from the answer, and kept with it."""
    from test_agents import THINKING_TEMPLATE

    template = tmp_path / "think.jinja"
    template.write_text(THINKING_TEMPLATE)
    server = LocalServer("--api-key", KEY, "--chat-template", str(template))
    try:
        at = send(page(url=server.url + "/v1", model=None), "Why is the sky blue?")
        assert not at.exception, at.exception
        reply = at.chat_message[1]
        [folded] = reply.expander
        assert folded.label == "Reasoning" and folded.markdown[0].value.strip()
        assert "<think>" not in folded.markdown[0].value
    finally:
        server.stop()
