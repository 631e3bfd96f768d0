"""Server settings; `llmhost serve` derives its flags from these fields."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmhost.errors import InvalidRequestError


class ServerSettings(BaseSettings):
    """How the API is exposed. Each field is a CLI flag and an `LLMHOST_*` environment variable."""

    model_config = SettingsConfigDict(env_prefix="LLMHOST_", extra="forbid", frozen=True)

    host: str = Field(
        "127.0.0.1", description="Address to bind; the default is reachable from this machine only."
    )
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0 picks a free one).")
    api_key: str | None = Field(
        None, description="Require this key as 'Authorization: Bearer KEY' on every route but /health."
    )
    api_key_file: Path | None = Field(None, description="Read the API keys from this file, one per line.")
    insecure_no_auth: bool = Field(
        False, description="Allow binding a non-loopback address without an API key."
    )
    max_body_mib: float = Field(
        32.0,
        gt=0,
        le=4096,
        description="Largest request body in MiB; a larger one is answered 413 before it is read.",
    )
    reasoning: Literal["on", "off"] | None = Field(
        None,
        description="Whether thinking models (Qwen3, QwQ) think when a request does not say "
        "(reasoning_effort, chat_template_kwargs.enable_thinking); default: the model's own.",
    )
    responses_kept: int = Field(
        256,
        ge=0,
        le=100_000,
        description="Responses API replies kept in memory (store: true) for previous_response_id and "
        "GET /v1/responses/ID; the oldest go first; 0 keeps none.",
    )
    drain_timeout: float = Field(
        30.0, ge=0, le=3600, description="Seconds SIGTERM waits for requests in flight before exiting."
    )

    def api_keys(self) -> list[str]:
        keys = [self.api_key] if self.api_key else []
        if self.api_key_file is not None:
            try:
                text = Path(self.api_key_file).read_text(encoding="utf-8")
            except OSError as err:
                raise InvalidRequestError(
                    f"cannot read --api-key-file {self.api_key_file}: {err.strerror}"
                ) from None
            found = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
            if not found:
                # an empty file must not silently leave the server open
                raise InvalidRequestError(
                    f"--api-key-file {self.api_key_file} holds no key (one key per line)"
                )
            keys += found
        return keys
