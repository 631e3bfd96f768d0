"""Settings of `llmhost web`; its flags derive from these fields, and the page process reads the
same fields from `LLMHOST_WEB_*` environment variables set by the launcher."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmhost.config import llmhost_home


class WebSettings(BaseSettings):
    """How the chat page is exposed and which API it talks to."""

    model_config = SettingsConfigDict(env_prefix="LLMHOST_WEB_", extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address the page binds; the default is this machine only.")
    port: int = Field(8501, ge=0, le=65535, description="Port of the page (0 picks a free one).")
    server: str | None = Field(
        None,
        description="Use this OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1) instead of "
        "starting a private llmhost server.",
    )
    api_key: str | None = Field(None, description="API key for --server.")
    open_browser: bool = Field(True, description="Open the page in the default browser.")
    db: Path | None = Field(
        None, description="SQLite file for conversations (default: conversations.db in the llmhost home)."
    )
    insecure_no_auth: bool = Field(
        False,
        description="Allow binding a non-loopback address: the page has no login, so anyone who "
        "reaches it can use the model.",
    )

    @field_validator("server")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:8000/v1")
        return api_base(value)

    def db_path(self) -> Path:
        return self.db or llmhost_home() / "web" / "conversations.db"


def api_base(url: str) -> str:
    """`http://h:p` → `http://h:p/v1`; a URL with a path is kept as given (some servers nest /v1)."""
    url = url.rstrip("/")
    return url if urlsplit(url).path else url + "/v1"
