"""The `llmhost` command. Importing this is cheap: torch and transformers load inside commands."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from llmhost import __version__
from llmhost.cli.common import command, load_model
from llmhost.cli.options import model_options
from llmhost.config import LoadSettings, PoolSettings
from llmhost.engine.params import GenerationParams
from llmhost.finetune.settings import FinetuneSettings
from llmhost.server.settings import ServerSettings
from llmhost.store.settings import PullOptions
from llmhost.web.settings import WebSettings

# batching limits matter only when many clients share a model
SERVING_ONLY = frozenset({"max_concurrency", "max_queue"})

app = typer.Typer(
    name="llmhost",
    help="Local chat models: chat in the terminal, serve an OpenAI-compatible API, fine-tune.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

ModelArg = Annotated[
    str | None,
    typer.Argument(
        metavar="[MODEL]", help="Model: a local HF folder or .gguf file; the embedded default if left out."
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmhost {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", envvar="LLMHOST_VERBOSE", help="Also show the libraries' warnings (stderr)."
        ),
    ] = False,
) -> None:
    """llmhost: local chat models from one command."""
    _library_warnings(verbose)


def _library_warnings(verbose: bool) -> None:
    """Warnings from torch, transformers or peft (deprecations, mostly) say nothing a user can act
    on: they go to the log, which --verbose prints, instead of between llmhost's own lines."""
    import logging

    logging.captureWarnings(True)
    logger = logging.getLogger("py.warnings")
    logger.propagate = False
    logger.handlers.clear()
    if verbose:
        from llmhost.cli.common import StderrHandler

        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("llmhost (verbose): %(message)s"))
        logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())


@app.command()
@command
@model_options(SERVING_ONLY, load=LoadSettings, params=GenerationParams)
def chat(model: ModelArg = None, *, load: LoadSettings, params: GenerationParams) -> None:
    """Chat in the terminal with streaming replies (/help inside for commands)."""
    from llmhost.cli.chat import ChatSession

    engine = load_model(model, load)
    try:
        ChatSession(engine, params).run()
    finally:
        engine.close()  # its inference thread and memory (a program may call this command again)


@app.command()
@command
@model_options(SERVING_ONLY, load=LoadSettings)
def embed(
    model: Annotated[str, typer.Argument(help="An embedding model: a store name or a folder.")],
    text: Annotated[str, typer.Argument(help="The text to embed; '-' reads stdin.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole vector as JSON.")] = False,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="The model's prompt to put first (query, document).")
    ] = None,
    dimensions: Annotated[
        int | None, typer.Option("--dimensions", min=1, help="Shorten the vector (Matryoshka models).")
    ] = None,
    *,
    load: LoadSettings,
) -> None:
    """Embed TEXT with an embedding model: its size, norm and first values (a quick try)."""
    import math

    from llmhost.engine.request import EmbedRequest
    from llmhost.errors import InvalidRequestError

    if text == "-":
        text = sys.stdin.read()
    if not text.strip():
        raise InvalidRequestError("the text is empty")
    engine = load_model(model, load)
    try:
        embedded = engine.embed(EmbedRequest([text], dimensions=dimensions, prompt=prompt))
    finally:
        engine.close()
    vector = embedded.vectors[0]
    if as_json:
        typer.echo(json.dumps({"model": engine.name, "tokens": embedded.prompt_tokens, "embedding": vector}))
        return
    norm = math.sqrt(sum(v * v for v in vector))
    first = ", ".join(f"{v:.4f}" for v in vector[:6])
    typer.echo(f"{engine.name}: {len(vector)} dimensions, norm {norm:.4f}, {embedded.prompt_tokens} tokens")
    typer.echo(f"[{first}, …]")


@app.command()
@command
@model_options(SERVING_ONLY, load=LoadSettings, params=GenerationParams)
def generate(
    args: Annotated[list[str], typer.Argument(metavar="[MODEL] PROMPT", help="PROMPT '-' reads stdin.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the reply with usage and timings as JSON.")
    ] = False,
    raw: Annotated[
        bool, typer.Option("--raw", help="Continue PROMPT as plain text, without the chat template.")
    ] = False,
    *,
    load: LoadSettings,
    params: GenerationParams,
) -> None:
    """Print one reply to PROMPT, for scripts."""
    from llmhost.errors import InvalidRequestError

    if len(args) > 2:
        raise InvalidRequestError("give at most two arguments: [MODEL] PROMPT (quote the prompt)")
    model, prompt = (None, args[0]) if len(args) == 1 else (args[0], args[1])
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise InvalidRequestError("the prompt is empty")
    from llmhost.engine.request import GenerationRequest

    engine = load_model(model, load)
    if raw:
        request = GenerationRequest(prompt=prompt, params=params)
    else:
        request = GenerationRequest([{"role": "user", "content": prompt}], params)
    try:
        if as_json:
            result = engine.generate(request)
            typer.echo(json.dumps({"model": engine.name, **result.to_dict()}, ensure_ascii=False))
            return
        for chunk in engine.stream(request):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    finally:
        engine.close()
    sys.stdout.write("\n")


@app.command()
@command
@model_options(load=LoadSettings, server=ServerSettings, pool=PoolSettings)
def serve(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[MODEL]...",
            help="Models to serve, loaded now and kept loaded; the embedded default if none (and no --all).",
        ),
    ] = None,
    *,
    load: LoadSettings,
    server: ServerSettings,
    pool: PoolSettings,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from llmhost.cli.common import console, quiet_loading
    from llmhost.server.run import check_exposure, open_pool
    from llmhost.server.run import serve as run_server

    warning = check_exposure(server)
    quiet_loading()
    served = open_pool(
        models, load, pool, lambda name: console.status(f"Loading {name or 'the embedded default model'}…")
    )
    if warning:
        console.print(f"[yellow]{warning}[/yellow]")
    run_server(served, server)


@app.command()
@command
@model_options(SERVING_ONLY, load=LoadSettings, pool=PoolSettings, page=WebSettings)
def web(model: ModelArg = None, *, load: LoadSettings, pool: PoolSettings, page: WebSettings) -> None:
    """Chat in the browser: a Streamlit page on a private llmhost server (or on --server URL)."""
    from llmhost.cli.common import console
    from llmhost.web.launcher import run

    raise typer.Exit(run(model, load, pool, page, say=lambda text: console.print(text, soft_wrap=True)))


@app.command()
@command
@model_options(opts=PullOptions)
def pull(
    model: Annotated[
        str, typer.Argument(metavar="NAME|REPO_ID", help="A catalog name or a hub repository id.")
    ],
    *,
    opts: PullOptions,
) -> None:
    """Download a model into the store (resumable; verified before it appears)."""
    from llmhost.cli.models import run_pull

    run_pull(model, opts)


JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.command("list")
@command
def list_(as_json: JsonFlag = False) -> None:
    """The models in the store: name, source, revision, format, size, path."""
    from llmhost.cli.models import list_models

    list_models(as_json)


@app.command()
@command
def ps(
    api_key: Annotated[
        str | None,
        typer.Option(envvar="LLMHOST_API_KEY", help="The servers' API key, if they need one."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """The running servers: each one's loaded models, adapters, memory, requests and idle time."""
    from llmhost.cli.ps import show_ps

    show_ps(api_key, as_json)


@app.command()
@command
def show(
    name: Annotated[str | None, typer.Argument(metavar="[NAME]", help="A store or catalog name.")] = None,
    catalog: Annotated[bool, typer.Option("--catalog", help="List the whole catalog.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Facts about a model: catalog entry and local copy."""
    from llmhost.cli.models import show as show_model
    from llmhost.cli.models import show_catalog
    from llmhost.errors import InvalidRequestError

    if catalog or name is None:
        if name is not None:
            raise InvalidRequestError("give NAME or --catalog, not both")
        return show_catalog(as_json)
    show_model(name, as_json)


@app.command()
@command
def rm(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    yes: Annotated[bool, typer.Option("-y", "--yes", help="Do not ask.")] = False,
) -> None:
    """Delete a model from the store."""
    from llmhost.cli.models import remove

    remove(name, yes)


class Task(str, Enum):
    rerank = "rerank"


@app.command("import")
@command
def import_(
    path: Annotated[str, typer.Argument(metavar="PATH", help="A Hugging Face model folder or a .gguf file.")],
    name: Annotated[str | None, typer.Option("--name", help="Store it under this name.")] = None,
    task: Annotated[
        Task | None,
        typer.Option(
            "--task",
            help="What it does, where its files cannot say: rerank for a yes/no reranker such as "
            "Qwen3-Reranker (embedding models and cross-encoders are read from their files).",
        ),
    ] = None,
) -> None:
    """Add a local model to the store (hard-linked when possible, else copied)."""
    from llmhost.cli.models import run_import

    run_import(path, name, task.value if task else None)


@app.command()
@command
def doctor(
    as_json: JsonFlag = False,
    context: Annotated[
        int, typer.Option("--context", min=256, help="Context length for the estimates.")
    ] = 4096,
    nvidia_smi: Annotated[
        Path | None,
        typer.Option(
            "--nvidia-smi", help="Read this saved nvidia-smi output instead (check another machine)."
        ),
    ] = None,
) -> None:
    """This machine: GPUs, driver vs torch, RAM, disk; which models fit, and the fix for a mismatch."""
    from llmhost.cli.doctor import run_doctor

    run_doctor(as_json, context, nvidia_smi)


@app.command()
@command
def estimate(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A catalog name, store name or HF folder.")],
    context: Annotated[
        int | None, typer.Option("--context", min=1, help="Context tokens (default: the model's).")
    ] = None,
    dtype: Annotated[
        list[str] | None,
        typer.Option(
            "--dtype", help="float32, bfloat16, float16, int8, int4, q8_0, q4_k_m, ... (repeatable)."
        ),
    ] = None,
    kv_cache: Annotated[
        str | None,
        typer.Option("--kv-cache", help="The KV cache as llama.cpp's --kv-cache stores it: f16, q8_0, q4_0."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Memory a model needs: weights + KV cache + overhead, per dtype."""
    from llmhost.cli.doctor import run_estimate

    run_estimate(model, context, dtype or [], as_json, kv_cache)


@app.command()
@command
@model_options(settings=FinetuneSettings)
def finetune(
    base: Annotated[
        str | None, typer.Argument(metavar="[BASE]", help="Model to adapt; the embedded default if left out.")
    ] = None,
    *,
    settings: FinetuneSettings,
) -> None:
    """LoRA fine-tuning on your JSONL data; the result is a store model named --name."""
    from llmhost.cli.finetune import run

    run(base, settings)


@app.command()
@command
def merge(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A fine-tuned model in the store.")],
    out: Annotated[str, typer.Option("--out", help="Store name of the merged model.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing model named --out.")
    ] = False,
) -> None:
    """Fold a LoRA adapter into its base: a standalone model (safetensors)."""
    from llmhost.cli.finetune import run_merge

    run_merge(name, out, overwrite)


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from llmhost.portable import watch_parent

    watch_parent()  # a server `llmhost web` started (macOS, Windows): it ends with the launcher
    app()
