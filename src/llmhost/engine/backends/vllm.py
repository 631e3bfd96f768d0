"""`--engine vllm`: vLLM's own OpenAI-compatible server as a managed child process.

llmhost starts it on a private loopback port with a random key (in its environment, not on its
command line), waits for its /health, and stands in front of it through the openai engine: the
same /v1 API, API keys, model names, metrics and error shape as every other engine. vLLM runs
from its own virtualenv (`--vllm-python`), since it pins its own torch and transformers.

When the child dies, requests get a 503 naming the exit code and the log, and llmhost logs why;
when llmhost stops or dies, the child's whole process tree goes with it (see vllm_child.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shlex
import threading
from pathlib import Path
from typing import Any

from llmhost.config import LoadSettings, llmhost_home
from llmhost.engine.backends.openai import OpenAIEngine, UpstreamError, upstream_errors
from llmhost.engine.chunks import Scored
from llmhost.engine.ref import ModelRef
from llmhost.engine.request import GenerationRequest, RerankRequest
from llmhost.engine.rerank import YesNoPrompt
from llmhost.errors import InvalidRequestError
from llmhost.installs import VLLM_INSTALL, VllmInstall, find_vllm
from llmhost.procs import Child, free_port, wait_http

log = logging.getLogger("llmhost.vllm")

CHILD = Path(__file__).with_name("vllm_child.py")
START_TIMEOUT_S = 1800.0  # a 70B model across nodes loads for many minutes


def locate(settings: LoadSettings) -> VllmInstall:
    install = find_vllm(settings.vllm_python)
    if install is None:
        where = f"{settings.vllm_python} has no vLLM" if settings.vllm_python else "vLLM is not installed"
        raise InvalidRequestError(f"--engine vllm: {where}; {VLLM_INSTALL}")
    return install


def check_parallel(folder: Path, name: str, tp: int) -> None:
    """vLLM splits attention heads across tensor-parallel ranks; say so now, not after a minute."""
    import json

    try:
        heads = int(json.loads((folder / "config.json").read_text())["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # an unusual config: let vLLM judge
    if heads % tp:
        fits = ", ".join(str(n) for n in range(1, heads + 1) if heads % n == 0)
        raise InvalidRequestError(
            f"{name} has {heads} attention heads, which --tensor-parallel-size {tp} does not divide; "
            f"use one of: {fits}"
        )


#: How vLLM reads Qwen3-Reranker's causal-LM files as a one-label classifier: the rows of "no"
#: and "yes" in its output layer become one (yes minus no), whose sigmoid is p(yes) of the two.
YES_NO_OVERRIDES = {
    "architectures": ["Qwen3ForSequenceClassification"],
    "classifier_from_token": ["no", "yes"],
    "is_original_qwen3_reranker": True,
}


def folder_task(folder: Path, name: str, declared: str | None) -> tuple[str, dict[str, Any] | None]:
    """chat, embed or rerank, from the folder's files as the local engines read them (vLLM runs
    the last two with its pooling runner), and the config overrides vLLM needs to read them."""
    from llmhost.engine.embedding import read_spec
    from llmhost.engine.rerank import read_rerank_spec

    if read_spec(folder) is not None:
        return "embed", None
    spec = read_rerank_spec(folder, declared)
    if spec is None:
        return "chat", None
    if spec.scoring == "yes-no":
        architectures = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures")
        if architectures != ["Qwen3ForCausalLM"]:
            raise InvalidRequestError(
                f"{name} is a yes/no reranker on {architectures}: vLLM reads Qwen3-Reranker's (Qwen3) files "
                "as a reranker; serve it with --engine transformers"
            )
        return "rerank", YES_NO_OVERRIDES
    return "rerank", None


def server_args(
    folder: Path,
    name: str,
    port: int,
    settings: LoadSettings,
    install: VllmInstall,
    task: str = "chat",
    overrides: dict[str, Any] | None = None,
) -> list[str]:
    """vLLM's server flags for llmhost's settings; --vllm-args come last, so they win."""
    args = ["--model", str(folder), "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port)]
    if task != "chat":
        args += ["--runner", "pooling"]
    if overrides:
        args += ["--hf-overrides", json.dumps(overrides)]
    args += ["--tensor-parallel-size", str(settings.tensor_parallel_size)]
    args += ["--pipeline-parallel-size", str(settings.pipeline_parallel_size)]
    # llmhost sends every sampling parameter itself: the model's generation_config must not
    # quietly add its own (a top_k, say) on top of what the caller asked for
    args += ["--generation-config", "vllm"]
    if settings.context_length:
        args += ["--max-model-len", str(settings.context_length)]
    if settings.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if settings.dtype != "auto":
        args += ["--dtype", settings.dtype]
    if settings.trust_remote_code:
        args.append("--trust-remote-code")
    if settings.chat_template:
        args += ["--chat-template", str(settings.chat_template)]
    if install.cpu:
        args.append("--enforce-eager")  # compiling graphs costs minutes on a CPU and gains little
    parsers = parser_args(_template_source(folder, settings)) if task == "chat" else []
    return args + parsers + shlex.split(settings.vllm_args or "")


def parser_args(template: str | None) -> list[str]:
    """vLLM's tool-call and reasoning parsers for the model's family, chosen from its chat
    template as llmhost's own parser is: tool calls pass through to vLLM and come back parsed."""
    args = ["--enable-auto-tool-choice", "--tool-call-parser"]
    args.append("qwen3_coder" if template and "<function=" in template else "hermes")
    if template and "<think>" in template:
        # Qwen3 and QwQ use ChatML; DeepSeek-R1 distills their own turns (and open the block)
        args += ["--reasoning-parser", "qwen3" if "<|im_start|>" in template else "deepseek_r1"]
    return args


def _template_source(folder: Path, settings: LoadSettings) -> str | None:
    try:
        if template := settings.read_chat_template():
            return template
        if (file := folder / "chat_template.jinja").is_file():
            return file.read_text(encoding="utf-8")
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def child_env(key: str, install: VllmInstall, settings: LoadSettings) -> dict[str, str]:
    env = {**os.environ, "VLLM_API_KEY": key, "HF_HUB_OFFLINE": "1"}  # the model is a local folder
    # a forced call (tool_choice required or named) is decoded against the tools' JSON schemas, so
    # its arguments always validate; vLLM's default instead lets the model write its own call
    # markup under a structural tag, and a model that does not (a small one) returns no call
    env.setdefault("VLLM_ENFORCE_STRICT_TOOL_CALLING", "0")
    # adapters are added when first requested (`VLLMEngine.add_adapter`), through its private API
    env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    if install.cpu:
        # else vLLM reserves most of a NUMA node's memory for its KV cache, and fails on a PC
        if settings.kv_cache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(settings.kv_cache_gib)))  # whole GiB only
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def load(ref: ModelRef, settings: LoadSettings) -> VLLMEngine:
    """vLLM serves a Hugging Face folder (GGUF models converted once). An adapter is served on its
    base by `llmhost serve` (the pool adds it to the running vLLM), or merged."""
    if ref.is_adapter:
        raise InvalidRequestError(
            f"{ref.name} is a LoRA adapter: `llmhost serve {ref.name} --engine vllm` serves it on its base, "
            f"or `llmhost merge {ref.name} NAME` makes a standalone model"
        )
    folder = ref.hf_folder()
    return VLLMEngine.start(folder, ref.name, settings, *folder_task(folder, ref.name, ref.declared_task))


class VLLMEngine(OpenAIEngine):
    """The openai engine, pointed at a vLLM server it owns."""

    kind = "vllm"
    serves_adapters = True

    child: Child
    _closing = False
    #: Qwen3-Reranker: llmhost writes its prompt (as the transformers engine does, user text as
    #: text) and vLLM scores the token ids on /classify; vLLM's own /rerank would parse control
    #: tokens in a document and needs the prompt from the client.
    yes_no: YesNoPrompt | None = None

    def add_adapter(self, name: str, path: Path) -> OpenAIEngine:
        """vLLM's runtime LoRA loading (the child runs with --enable-lora): requests for `name`
        go to the same vLLM server, which batches adapters and base together."""
        import httpx

        self.check()
        r = httpx.post(
            f"{self.base_url}/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(path)},
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=600,
        )
        if r.status_code != 200:
            raise UpstreamError(f"vLLM could not load the adapter {name}: {r.text[:300]}", 502)
        view = OpenAIEngine(self.base_url, self.api_key, name, self.context_length)
        view.kind = self.kind
        return view

    def count_tokens(self, request: GenerationRequest) -> int:
        """vLLM's own /tokenize, given what a chat request would send (template, tools)."""
        import httpx

        self.check()
        body = self._body(request)
        payload = {k: body[k] for k in ("model", "messages", "prompt", "tools") if k in body}
        if "messages" in payload:
            payload["add_generation_prompt"] = True
            if kwargs := body.get("extra_body", {}).get("chat_template_kwargs"):
                payload["chat_template_kwargs"] = kwargs
        with upstream_errors(self.base_url, self.unreachable):
            r = httpx.post(
                f"{self._root}/tokenize",
                json=payload,
                headers={"Authorization": f"Bearer {self.api_key}"},
                timeout=60,
            )
        if r.status_code != 200:
            raise UpstreamError(f"vLLM could not count the tokens: {r.text[:300]}", 502)
        return int(r.json()["count"])

    def rerank(self, request: RerankRequest) -> Scored:
        if self.yes_no is None:
            return super().rerank(request)
        return self._classified(self._post(self._sync, self._root + "/classify", self._rows(request)))

    async def arerank(self, request: RerankRequest) -> Scored:
        if self.yes_no is None:
            return await super().arerank(request)
        body = await asyncio.to_thread(self._rows, request)  # tokenizing long documents
        return self._classified(await self._post(self._async, self._root + "/classify", body))

    def _rows(self, request: RerankRequest) -> dict[str, Any]:
        assert self.yes_no is not None
        return {"model": self.name, "input": self.yes_no.rows(request), "use_activation": True}

    def _classified(self, got: Any) -> Scored:
        try:
            data = sorted(got["data"], key=lambda d: d["index"])
            return Scored([float(d["probs"][0]) for d in data], int(got["usage"]["prompt_tokens"]))
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
            raise self._odd("rerank", err) from None

    @property
    def _root(self) -> str:
        """vLLM's own routes (/classify, /tokenize) are beside /v1, not under it."""
        return self.base_url.removesuffix("/").removesuffix("/v1")

    @classmethod
    def start(
        cls,
        folder: Path,
        name: str,
        settings: LoadSettings,
        task: str = "chat",
        overrides: dict[str, Any] | None = None,
    ) -> VLLMEngine:
        check_parallel(folder, name, settings.tensor_parallel_size)
        # Qwen3-Reranker's prompt is llmhost's: its tokenizer first, so a refusal starts no vLLM
        tokenizer = _yes_no_tokenizer(folder, name, settings) if overrides is YES_NO_OVERRIDES else None
        install = locate(settings)
        port, key = free_port(), secrets.token_urlsafe(24)
        # -I: the script's folder must not go on sys.path: its neighbours are named vllm.py,
        # openai.py and transformers.py, which would shadow the real packages in vLLM's Python
        cmd = [str(install.python), "-I", "-u", str(CHILD), str(os.getpid())]
        cmd += server_args(folder, name, port, settings, install, task, overrides)
        logfile = llmhost_home() / "logs" / f"vllm-{name.replace('/', '_')}-{port}.log"
        child = Child("vLLM server", cmd, child_env(key, install, settings), logfile, group=True)
        log.info("starting vLLM %s for %s (log: %s)", install.version, name, logfile)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", START_TIMEOUT_S, child)
            base = f"http://127.0.0.1:{port}/v1"
            engine = cls(base, key, name, context_length=_max_model_len(base, key, name))
        except BaseException:
            child.stop()
            raise
        engine.child, engine.task = child, task
        if tokenizer is not None:
            engine.yes_no = YesNoPrompt(tokenizer, engine.context_length)
        engine.placement = "cpu" if install.cpu else f"cuda (vLLM, TP {settings.tensor_parallel_size})"
        threading.Thread(target=engine._watch, name="vllm-watch", daemon=True).start()
        return engine

    def _watch(self) -> None:
        """Log why the child died; requests learn it from `problem` without waiting."""
        self.child.proc.wait()
        if self.problem is not None:
            last = " | ".join(ln for ln in self.child.last_lines(6) if not ln.startswith("llmhost-vllm:"))
            log.error("%s. Its last output: %s", self.problem, last)

    @property
    def problem(self) -> str | None:
        """Set once the child has exited (and llmhost is not the one stopping it). Never blocks:
        requests and /health ask it from the event loop."""
        code = self.child.proc.poll()
        if code is None or self._closing:
            return None
        for line in list(self.child.tail):  # the wrapper ends its group with SIGKILL; the server's code
            if m := re.search(r"llmhost-vllm: the vLLM server exited with code (-?\d+)", line):
                code = int(m.group(1))
        return (
            f"the vLLM server for {self.name} stopped (exit code {code}); its log: "
            f"{self.child.log_path}; restart llmhost to start it again"
        )

    def check(self) -> None:
        if (problem := self.problem) is not None:
            raise UpstreamError(problem, 503)

    def unreachable(self) -> None:
        self.check()  # a refused connection from a child that died says why

    def close(self) -> None:
        self._closing = True
        super().close()
        self.child.stop(timeout=20)


def _yes_no_tokenizer(folder: Path, name: str, settings: LoadSettings) -> Any:
    from transformers import AutoTokenizer

    from llmhost.engine.backends.hf_folder import load_errors
    from llmhost.engine.rerank import yes_no_ids

    with load_errors(folder, None, settings.trust_remote_code):
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=settings.trust_remote_code)
    yes_no_ids(tokenizer, name)  # vLLM's conversion reads the same two tokens
    return tokenizer


def _max_model_len(base_url: str, key: str, name: str) -> int:
    """vLLM reports the context it was started with in its model list."""
    import httpx

    data = httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    for model in data.get("data", []):
        if model.get("id") == name:
            return int(model.get("max_model_len") or 0)
    return 0


#: The LoRA ranks vLLM accepts for --max-lora-rank.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(base: ModelRef | None) -> int:
    """The largest LoRA rank among the store's adapters of `base` (vLLM sizes its buffers for it)."""
    import contextlib
    import json

    from llmhost.store.local import Store

    rank = 8
    if base is None:
        return rank
    for stored in Store().list():
        if stored.format == "lora" and stored.extra.get("base") in (base.key, base.name):
            with contextlib.suppress(OSError, ValueError, TypeError):
                config = json.loads((stored.folder / "adapter_config.json").read_text(encoding="utf-8"))
                rank = max(rank, int(config.get("r", 8)))
    return next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1])


def with_lora(settings: LoadSettings, base: ModelRef | None) -> LoadSettings:
    """`settings` with vLLM's runtime LoRA on, sized for the store's adapters of `base`; the
    user's own --vllm-args come after, so they win."""
    lora = f"--enable-lora --max-loras 4 --max-lora-rank {adapter_rank(base)}"
    return settings.model_copy(update={"vllm_args": f"{lora} {settings.vllm_args or ''}"})
