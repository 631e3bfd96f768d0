"""UI text in English and Chinese, and server errors in plain words.

The language follows the browser (`zh*` → Chinese) unless the sidebar switch picks one.
"""

from __future__ import annotations

from typing import Any

import openai

Lang = str  # "en" or "zh"

TEXT: dict[str, dict[Lang, str]] = {
    "title": {"en": "llmhost chat", "zh": "llmhost 聊天"},
    "language": {"en": "Language / 语言", "zh": "Language / 语言"},
    "auto": {"en": "Auto (browser)", "zh": "自动（跟随浏览器）"},
    "model": {"en": "Model", "zh": "模型"},
    "system": {"en": "System prompt", "zh": "系统提示词"},
    "system_help": {
        "en": "Instructions the model follows in this conversation.",
        "zh": "模型在本对话中遵循的指令。",
    },
    "max_tokens": {"en": "Max new tokens", "zh": "最大生成长度（token）"},
    "temperature": {"en": "Temperature", "zh": "温度（temperature）"},
    "temperature_help": {"en": "0 = always the most likely token.", "zh": "0 表示总是选最可能的 token。"},
    "top_p": {"en": "Top-p", "zh": "Top-p"},
    "new_chat": {"en": "New chat", "zh": "新对话"},
    "conversations": {"en": "Conversations", "zh": "历史对话"},
    "untitled": {"en": "New conversation", "zh": "新对话"},
    "manage": {"en": "This conversation", "zh": "当前对话"},
    "rename": {"en": "Title", "zh": "标题"},
    "delete": {"en": "Delete", "zh": "删除"},
    "export_md": {"en": "Export Markdown", "zh": "导出 Markdown"},
    "export_json": {"en": "Export JSON", "zh": "导出 JSON"},
    "placeholder": {"en": "Ask anything", "zh": "输入你的问题"},
    "regenerate": {"en": "Regenerate", "zh": "重新生成"},
    "retry": {"en": "Retry", "zh": "重试"},
    "stopped": {"en": "stopped", "zh": "已停止"},
    "tokens": {"en": "tokens", "zh": "tokens"},
    "ttft": {"en": "first token", "zh": "首字延迟"},
    "tps": {"en": "tokens/s", "zh": "tokens/秒"},
    "reasoning": {"en": "Reasoning", "zh": "思考过程"},
    "dropped": {
        "en": "{n} older message(s) were left out so the conversation fits the model's context.",
        "zh": "为适应模型的上下文长度，省略了较早的 {n} 条消息。",
    },
    "empty": {"en": "Ask a question to start.", "zh": "输入问题开始对话。"},
    "no_models": {"en": "The server lists no models.", "zh": "服务器没有可用的模型。"},
    "not_loaded": {"en": "loads on first message", "zh": "首条消息时加载"},
    "err_connect": {
        "en": "Cannot reach the model server at {url}. Is it running? Your message is kept: press Retry.",
        "zh": "无法连接模型服务器 {url}，请确认它正在运行。你的消息已保留，可点击“重试”。",
    },
    "err_auth": {
        "en": "The server refused the API key. Start the page with the right --api-key.",
        "zh": "服务器拒绝了 API 密钥，请用正确的 --api-key 启动页面。",
    },
    "err_context": {
        "en": "The conversation is too long for the model's context window. Start a new chat, or "
        "lower “Max new tokens”.",
        "zh": "对话超出了模型的上下文长度。请开始新对话，或调低“最大生成长度”。",
    },
    "err_busy": {
        "en": "The server is busy. Wait a moment and press Retry.",
        "zh": "服务器繁忙，请稍后点击“重试”。",
    },
    "err_model": {
        "en": "The server does not have the model “{model}”. Pick another in the sidebar.",
        "zh": "服务器上没有模型“{model}”，请在侧边栏选择其他模型。",
    },
    "err_other": {"en": "The server answered with an error: {detail}", "zh": "服务器返回错误：{detail}"},
}


def language(choice: str, locale: str | None) -> Lang:
    """`choice` is "auto", "en" or "zh"; auto follows the browser's locale."""
    if choice in ("en", "zh"):
        return choice
    return "zh" if (locale or "").lower().startswith("zh") else "en"


def t(key: str, lang: Lang, **values: Any) -> str:
    text = TEXT[key].get(lang) or TEXT[key]["en"]
    return text.format(**values) if values else text


def describe_error(err: Exception, lang: Lang, url: str, model: str) -> str:
    """A server error in plain words that say what to do."""
    if isinstance(err, openai.APIConnectionError):  # includes timeouts
        return t("err_connect", lang, url=url)
    if isinstance(err, openai.AuthenticationError | openai.PermissionDeniedError):
        return t("err_auth", lang)
    body = getattr(err, "body", None)
    code = body.get("code") if isinstance(body, dict) else None
    status = getattr(err, "status_code", None)
    if code == "context_length_exceeded" or "context length" in str(err).lower():
        return t("err_context", lang)
    if isinstance(err, openai.NotFoundError) or code == "model_not_found":
        return t("err_model", lang, model=model)
    if status in (429, 503) or isinstance(err, openai.RateLimitError):
        return t("err_busy", lang)
    detail = body.get("message") if isinstance(body, dict) and body.get("message") else str(err)
    return t("err_other", lang, detail=detail)
