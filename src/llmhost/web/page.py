"""The Streamlit page. Rendering only: conversations live in `history`, requests in `client`.

Every run draws the page from the database, so a refresh, a second tab or a restart shows the
same thing. The current conversation is kept in the URL (`?c=ID`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import openai
import streamlit as st

from llmhost.web.client import ChatClient, ChatRequest, ModelInfo, ReplyStats
from llmhost.web.history import Conversation, ConversationStore, Message, to_json, to_markdown
from llmhost.web.i18n import Lang, describe_error, language, t
from llmhost.web.settings import WebSettings

MAX_LISTED = 50


@dataclass(frozen=True)
class Controls:
    model: ModelInfo | None
    max_tokens: int
    temperature: float
    top_p: float


@st.cache_resource
def _store(path: str) -> ConversationStore:
    return ConversationStore(path)  # type: ignore[arg-type]


@st.cache_resource
def _client(base_url: str, api_key: str | None) -> ChatClient:
    return ChatClient(base_url, api_key)


@st.cache_data(ttl=15, show_spinner=False)
def _models(base_url: str, api_key: str | None) -> list[ModelInfo]:
    return _client(base_url, api_key).models()


def main() -> None:
    st.set_page_config(page_title="llmhost", page_icon="💬")
    settings = WebSettings()
    base_url = settings.server or "http://127.0.0.1:8000/v1"
    store = _store(str(settings.db_path()))
    client = _client(base_url, settings.api_key)
    lang = language(st.session_state.get("lang_choice", "auto"), st.context.locale)
    conv = _current(store)
    controls = _sidebar(store, conv, lang, base_url, settings.api_key)
    st.title(t("title", lang))
    messages = store.messages(conv.id) if conv else []
    for message in messages:
        _show(message, lang)
    prompt = st.chat_input(t("placeholder", lang), key="prompt", submit_mode="stop")
    if prompt and prompt.strip():
        conv = conv or _new_conversation(store)
        store.add(conv.id, "user", prompt)
        st.session_state.pop("error", None)
        with st.chat_message("user"):
            st.markdown(prompt)
        _reply(store, client, conv, controls, lang)
    elif st.session_state.pop("regenerate", False) and conv:
        _reply(store, client, conv, controls, lang)
    elif conv and messages:
        _after_history(store, conv, messages, lang)
    else:
        st.caption(t("empty", lang))


def _current(store: ConversationStore) -> Conversation | None:
    """The conversation in the URL, else this session's, else the most recent one."""
    wanted = st.session_state.get("conv_id", st.query_params.get("c"))
    conv = store.get(wanted) if wanted else None
    if conv is None and "conv_id" not in st.session_state:
        recent = store.list()[:1]
        conv = recent[0] if recent else None
    st.session_state["conv_id"] = conv.id if conv else None
    if conv:
        st.query_params["c"] = conv.id
    else:
        st.query_params.pop("c", None)
    return conv


def _new_conversation(store: ConversationStore) -> Conversation:
    conv = store.create(system=st.session_state.get("system-new", ""))
    st.session_state["conv_id"] = conv.id
    st.query_params["c"] = conv.id
    return conv


def _sidebar(
    store: ConversationStore, conv: Conversation | None, lang: Lang, base_url: str, api_key: str | None
) -> Controls:
    sb = st.sidebar
    sb.selectbox(
        t("language", lang),
        ["auto", "en", "zh"],
        key="lang_choice",
        format_func=lambda c: {"auto": t("auto", lang), "en": "English", "zh": "中文"}[c],
    )
    model = _model_picker(lang, base_url, api_key)
    key = f"system-{conv.id if conv else 'new'}"
    sb.text_area(
        t("system", lang),
        value=conv.system if conv else "",
        key=key,
        help=t("system_help", lang),
        on_change=lambda: conv and store.set_system(conv.id, st.session_state[key]),
    )
    controls = Controls(
        model=model,
        max_tokens=sb.slider(t("max_tokens", lang), 16, 4096, 512, step=16, key="max_tokens"),
        temperature=sb.slider(
            t("temperature", lang),
            0.0,
            2.0,
            0.3,  # small chat models ramble when sampled hotter
            step=0.05,
            key="temperature",
            help=t("temperature_help", lang),
        ),
        top_p=sb.slider(t("top_p", lang), 0.05, 1.0, 0.9, step=0.05, key="top_p"),
    )
    sb.button(t("new_chat", lang), key="new_chat", on_click=_switch, args=(None,), use_container_width=True)
    if conv:
        _manage(store, conv, lang)
    _conversation_list(store, conv, lang)
    return controls


def _model_picker(lang: Lang, base_url: str, api_key: str | None) -> ModelInfo | None:
    try:
        models = _models(base_url, api_key)
    except openai.OpenAIError as err:
        st.sidebar.error(describe_error(err, lang, base_url, ""))
        return None
    if not models:
        st.sidebar.warning(t("no_models", lang))
        return None
    by_id = {m.id: m for m in models}
    chosen = st.sidebar.selectbox(
        t("model", lang),
        list(by_id),
        key="model",
        # a model that is not loaded answers its first message after loading
        format_func=lambda m: m if by_id[m].loaded is not False else f"{m} ({t('not_loaded', lang)})",
    )
    return by_id.get(chosen)


def _manage(store: ConversationStore, conv: Conversation, lang: Lang) -> None:
    with st.sidebar.expander(t("manage", lang)):
        key = f"rename-{conv.id}"
        st.text_input(
            t("rename", lang),
            value=conv.title,
            key=key,
            on_change=lambda: store.rename(conv.id, st.session_state[key]),
        )
        messages = store.messages(conv.id)
        stem = re.sub(r"[^\w-]+", "-", conv.title).strip("-")[:40] or "conversation"
        st.download_button(
            t("export_md", lang),
            to_markdown(conv, messages),
            f"{stem}.md",
            "text/markdown",
            key="export_md",
            on_click="ignore",
        )
        st.download_button(
            t("export_json", lang),
            to_json(conv, messages),
            f"{stem}.json",
            "application/json",
            key="export_json",
            on_click="ignore",
        )
        st.button(t("delete", lang), key="delete", on_click=_delete, args=(store, conv.id), type="primary")


def _conversation_list(store: ConversationStore, conv: Conversation | None, lang: Lang) -> None:
    st.sidebar.subheader(t("conversations", lang))
    for item in store.list()[:MAX_LISTED]:
        st.sidebar.button(
            item.title or t("untitled", lang),
            key=f"conv-{item.id}",
            on_click=_switch,
            args=(item.id,),
            type="primary" if conv and item.id == conv.id else "tertiary",
            use_container_width=True,
        )


def _switch(conv_id: str | None) -> None:
    st.session_state["conv_id"] = conv_id
    st.session_state.pop("error", None)


def _delete(store: ConversationStore, conv_id: str) -> None:
    store.delete(conv_id)
    rest = store.list()[:1]
    _switch(rest[0].id if rest else None)


def _show(message: Message, lang: Lang) -> None:
    with st.chat_message(message.role):
        if message.meta.get("dropped_turns"):
            st.caption(t("dropped", lang, n=message.meta["dropped_turns"]))
        if message.meta.get("reasoning"):
            with st.expander(t("reasoning", lang), expanded=False):
                st.markdown(message.meta["reasoning"])
        st.markdown(message.content)  # never unsafe_allow_html: model output is not trusted
        if message.role == "assistant":
            st.caption(stats_line(message.meta, lang))


def stats_line(meta: dict, lang: Lang) -> str:
    parts = []
    if meta.get("completion_tokens") is not None:
        parts.append(f"{meta['completion_tokens']} {t('tokens', lang)}")
    if meta.get("ttft_s") is not None:
        parts.append(f"{t('ttft', lang)} {meta['ttft_s']:.2f} s")
    if meta.get("tokens_per_s") is not None:
        parts.append(f"{meta['tokens_per_s']:.1f} {t('tps', lang)}")
    if meta.get("stopped"):
        parts.append(t("stopped", lang))
    return " · ".join(parts)


def _after_history(store: ConversationStore, conv: Conversation, messages: list[Message], lang: Lang) -> None:
    """Below the conversation: the last error (the user's message is kept), Regenerate or Retry."""
    error = st.session_state.get("error")
    if error and error[0] == conv.id and messages[-1].role == "user":
        st.error(error[1])
    label = t("regenerate" if messages[-1].role == "assistant" else "retry", lang)
    st.button(label, key="regenerate_button", on_click=_regenerate, args=(store, conv.id))


def _regenerate(store: ConversationStore, conv_id: str) -> None:
    store.drop_last_reply(conv_id)
    st.session_state["regenerate"] = True
    st.session_state.pop("error", None)


#: Seconds between redraws of a streaming reply.
RENDER_EVERY_S = 0.05


def _draw(thoughts: Any, placeholder: Any, reasoning: str, text: str, lang: Lang) -> None:
    if reasoning:  # folded away above the answer, as the finished message shows it
        with thoughts.container(), st.expander(t("reasoning", lang), expanded=not text):
            st.markdown(reasoning)
    placeholder.markdown(text)


def _reply(
    store: ConversationStore, client: ChatClient, conv: Conversation, controls: Controls, lang: Lang
) -> None:
    """Stream a reply to the conversation's last message and store it, even when stopped."""
    history = [{"role": m.role, "content": m.content} for m in store.messages(conv.id)]
    model = controls.model
    current = store.get(conv.id)
    request = ChatRequest(
        model=model.id if model else "default",
        messages=history,
        system=current.system if current else "",
        max_tokens=controls.max_tokens,
        temperature=controls.temperature,
        top_p=controls.top_p,
        truncate_history=bool(model and model.is_llmhost),
    )
    st.session_state["last_request"] = request.to_kwargs()
    text, reasoning, stats, done = "", "", ReplyStats(), False
    with st.chat_message("assistant"):
        thoughts = st.empty()
        placeholder = st.empty()
        stream = None
        shown = 0.0
        try:
            stream = client.stream(request)
            for thought, piece in stream:
                text, reasoning = text + piece, reasoning + thought
                # redrawing markdown on every token costs the page more than the model takes to
                # write it: draw at most every RENDER_EVERY_S, and once at the end
                if time.monotonic() - shown >= RENDER_EVERY_S:
                    _draw(thoughts, placeholder, reasoning, text, lang)
                    shown = time.monotonic()
            _draw(thoughts, placeholder, reasoning, text, lang)
            stats, done = stream.stats, True
        except openai.OpenAIError as err:
            st.session_state["error"] = (conv.id, describe_error(err, lang, client.base_url, request.model))
            done = True
        finally:  # also runs when Stop or another click interrupts this run
            if stream is not None:
                stream.close()  # hanging up cancels the generation on the server
                stats = stream.stats
            if text or reasoning:
                stats.stopped = not done
                meta = {**stats.to_meta(), "model": request.model}
                if reasoning:
                    meta["reasoning"] = reasoning
                store.add(conv.id, "assistant", text, meta)
            if model is not None and model.loaded is False:
                _models.clear()  # the reply loaded it: the picker says so on the next run
    st.rerun()  # draw the finished conversation from the database, with its buttons
