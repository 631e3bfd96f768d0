"""Paths and load settings. No heavy imports here: the CLI imports this at start-up."""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import shlex
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmhost.errors import LlmhostError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
#: llama.cpp's weight repack (engine/backends/llamacpp/repack.py, store/probes.py)
Repack = Literal["auto", "on", "off"]
#: KV cache element types: 16-bit, or llama.cpp's quantized block formats
KvCache = Literal["f16", "q8_0", "q4_0"]
#: bytes per cached key or value element: q8_0 keeps 32 int8 values and an f16 scale per
#: block of 32, q4_0 32 nibbles and a scale
KV_ELEMENT_BYTES: dict[str, float] = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def llmhost_home() -> Path:
    """Where llmhost keeps converted models and (later) its store: `LLMHOST_HOME` or the user cache."""
    env = os.environ.get("LLMHOST_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("llmhost", appauthor=False))


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (binding them needs no API key)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LoadSettings(BaseSettings):
    """How a model is loaded. Each field is also a CLI flag and an `LLMHOST_*` environment variable."""

    model_config = SettingsConfigDict(env_prefix="LLMHOST_", extra="forbid", frozen=True)

    engine: Literal["auto", "transformers", "llamacpp", "vllm", "openai"] = Field(
        "auto",
        description="What runs the model: transformers, llamacpp (GGUF on the CPU, needs "
        "llmhost[llamacpp]), vllm (vLLM's server as a managed child, for GPUs and clusters), or "
        "openai (an OpenAI-compatible --upstream such as a vLLM or Ollama fleet). auto: openai "
        "when --upstream is given, llamacpp for GGUF models when installed, else transformers.",
    )
    upstream: str | None = Field(None, description="Base URL of the upstream API for --engine openai.")
    upstream_key: str | None = Field(None, description="API key llmhost sends to the upstream.")
    dtype: Dtype = Field(
        "auto",
        description="Weights dtype: auto picks bfloat16 on GPUs and CPUs that support it, "
        "else float32 (float16 on older GPUs).",
    )
    device: str = Field("auto", description="Device: auto, cpu, cuda, cuda:N or mps.")
    n_gpu_layers: int | None = Field(
        None,
        ge=-1,
        description="llama.cpp: layers on the GPU (-1: all; 0: none). Default: all that fit the free "
        "GPU memory, none on a CPU build of llama-cpp-python. The transformers engine uses --device.",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model (only for models you trust)."
    )
    chat_template: Path | None = Field(
        None, description="Jinja chat template file, for models without one or to override it."
    )
    context_length: int | None = Field(
        None,
        ge=16,
        description="Override the model's context window (tokens); vLLM's --max-model-len.",
        json_schema_extra={"flags": ["--max-model-len"]},
    )
    max_concurrency: int = Field(
        8, ge=1, le=256, description="Most requests decoded together, each step one forward pass."
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        le=4096,
        description="KV cache memory in GiB: for llama.cpp, shared among its slots, one per "
        "concurrent request (default: each slot the model's window up to 4096 tokens); for "
        "transformers, finished requests' KV kept for prefix reuse (default 1, at most a quarter "
        "of the free memory); for vLLM on a CPU (default 1).",
    )
    kv_cache: KvCache = Field(
        "f16",
        description="KV cache type on llama.cpp: f16, q8_0 (about half the memory: twice the context "
        "in the same RAM, at a small cost in quality) or q4_0 (about a quarter, a larger cost). The "
        "transformers engine takes f16 (the model's dtype) or q8_0 (llama.cpp's blocks, in torch); for "
        "vLLM pass --vllm-args '--kv-cache-dtype fp8'.",
    )
    speculative: Literal["auto", "ngram", "draft", "off"] = Field(
        "auto",
        description="Speculation (llama.cpp and transformers engines): guess the next tokens and check "
        "several per pass. auto: prompt lookup (guesses from the text so far, where a reply repeats "
        "its prompt: an edited file, a quoted passage) where the engine checks them exactly "
        "(llama.cpp's reference kernels: a greedy reply is the same tokens) and while the cost "
        "measured at load says it pays; ngram: prompt lookup wherever a guess is found; draft: the "
        "--draft-model's guesses (llama.cpp; the default with --draft-model); off. A request may say "
        "`speculative` itself.",
    )
    draft_model: str | None = Field(
        None,
        description="llama.cpp: a small GGUF model with the same tokenizer that proposes tokens for "
        "--speculative draft (Qwen2.5-0.5B-Instruct for Qwen2.5-7B-Instruct): a store name or a .gguf "
        "path. Refused when its vocabulary differs.",
    )
    max_queue: int = Field(
        64, ge=0, le=100000, description="Most requests waiting for a batch slot; more are refused."
    )
    prefix_cache: Literal["exact", "fast"] = Field(
        "exact",
        description="How the local engines reuse a kept prompt prefix. exact: a greedy reply equals "
        "a cold run's. On llama.cpp, ggml's reference kernels make a reply's decoded cells a cold "
        "run's where they can (Q4_0, Q4_1, Q8_0, measured at load), so a next turn prefills only its "
        "new message (long prompts prefill up to a third slower); elsewhere, and on transformers, a "
        "reply is made reusable while the engine is idle. fast: the default kernels, and a reply's "
        "cells reused as decoded, as llama-server, vLLM and Ollama do: replies may differ from a "
        "cold run's in the logits' last bits.",
    )
    weight_repack: Repack = Field(
        "auto",
        description="llama.cpp: repack weights at load for ggml's fastest CPU kernels (AVX Q4_0/IQ4_NL "
        "layouts, AMX tiles); llama-server's --no-repack is off. auto: on, except where the CPU "
        "advertises AMX and a one-time probe in a child process finds that it faults (some virtual "
        "machines); `llmhost doctor` shows the decision.",
    )
    reference_kernels: bool = Field(
        True,
        description="llama.cpp with --prefix-cache exact: try ggml's reference kernels, which make a "
        "reply's decoded cells reusable as they are (measured at load). Off: the default kernels, "
        "and replies are made reusable while the engine is idle.",
    )

    # vLLM only (--engine vllm); the names and meanings are vLLM's own
    tensor_parallel_size: int = Field(
        1, ge=1, le=1024, description="vLLM: GPUs each copy of the model is split across."
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, le=1024, description="vLLM: pipeline stages (across nodes: one per node)."
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM: share of each GPU's memory it may take (vLLM: 0.9)."
    )
    vllm_python: Path | None = Field(
        None,
        description="Python of the virtualenv vLLM is installed in (default: this one, or the "
        "one behind a `vllm` command on PATH).",
    )
    vllm_args: str | None = Field(
        None,
        description="More vLLM server flags, one shell-quoted string, e.g. "
        "'--distributed-executor-backend ray --max-num-seqs 64'.",
    )

    @field_validator("vllm_args")
    @classmethod
    def _splittable(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                shlex.split(value)
            except ValueError as err:  # e.g. an unclosed quote
                raise ValueError(f"cannot split it like a shell would ({err}): check its quotes") from None
        return value

    @property
    def speculation(self) -> str:
        """The engine's default speculation: `draft` where a draft model is given and auto asked."""
        return "draft" if self.draft_model and self.speculative == "auto" else self.speculative

    @property
    def exact_prefix(self) -> bool:
        """Whether a reused prefix must give a cold run's replies (`--prefix-cache exact`)."""
        return self.prefix_cache == "exact"

    def read_chat_template(self) -> str | None:
        """The --chat-template file's text (None when not given); unreadable is a clear error."""
        if self.chat_template is None:
            return None
        try:
            return Path(self.chat_template).read_text(encoding="utf-8")
        except OSError as err:
            raise LlmhostError(f"cannot read --chat-template {self.chat_template}: {err.strerror}") from None


# vLLM settings that mean nothing to other engines (--vllm-python is only a location: an
# LLMHOST_VLLM_PYTHON in the user's environment must not break the other engines)
VLLM_ONLY = ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "vllm_args")


class PoolSettings(BaseSettings):
    """Which models a server offers and how many it keeps loaded. Each field is a CLI flag of
    `llmhost serve` and an `LLMHOST_*` environment variable."""

    model_config = SettingsConfigDict(env_prefix="LLMHOST_", extra="forbid", frozen=True)

    all: bool = Field(
        False,
        description="Serve every model in the store and the embedded default, each loaded on its first "
        "request; models added while the server runs (a finished finetune) are served at once.",
    )
    max_loaded: int | None = Field(
        None, ge=1, description="Most models loaded at once; the least recently used idle one makes room."
    )
    memory_gib: float | None = Field(
        None,
        gt=0,
        description="Memory loaded models may take, in GiB (RAM, or GPU memory for GPU models); "
        "default: 90% of what is free when the server starts.",
    )
    model_alias: list[str] = Field(
        default_factory=lambda: ["claude-*"],
        description="PATTERN=NAME: a model name the server does not serve that matches PATTERN "
        "(shell-style) is answered by NAME, or by the first model served when NAME is left out; "
        "repeatable. Default: claude-* (Claude Code's model names run on the served model).",
    )
    keep_alive: str = Field(
        "5m",
        description="Unload a model loaded on demand once idle this long (30s, 5m, 1h; -1: never; "
        "0: after each request). Models named on the command line stay loaded.",
    )

    @field_validator("model_alias")
    @classmethod
    def _aliases(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not entry.partition("=")[0].strip():
                raise ValueError(f"{entry!r} has no pattern: write PATTERN=NAME, e.g. 'claude-*=qwen'")
        return value

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @property
    def keep_alive_s(self) -> float | None:
        return parse_duration(self.keep_alive)

    def alias(self, name: str, first: str | None) -> tuple[str, str] | None:
        """(the served name that answers `name`, the --model-alias entry that says so), or None;
        an entry without =NAME means `first`, the first model served."""
        for entry in self.model_alias:
            pattern, _, target = (part.strip() for part in entry.partition("="))
            if fnmatch.fnmatchcase(name, pattern) and (target or first):
                return target or first or "", entry
        return None


def parse_duration(text: str) -> float | None:
    """'30s', '5m', '1h', '90' (seconds) → seconds; '-1' (or any negative) → None: forever."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a duration: write 30s, 5m, 1h, or -1 for never")
    value = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return None if value < 0 else value
