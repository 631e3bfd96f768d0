"""The terminal chat: streaming replies, multi-turn memory, slash commands, Ctrl-C stops a reply."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from llmhost.cli.common import console
from llmhost.engine import Engine, GenerationParams, GenerationRequest
from llmhost.engine.chunks import Chunk
from llmhost.errors import LlmhostError

HELP = """commands:
  /clear          forget the conversation
  /system TEXT    set the system prompt (and clear the conversation); /system alone removes it
  /exit           leave (Ctrl-D works too)
Ctrl-C stops the reply being written."""


class ChatSession:
    def __init__(
        self,
        engine: Engine,
        params: GenerationParams,
        read: Callable[[str], str] = input,
        out: TextIO | None = None,
    ) -> None:
        self.engine = engine
        self.params = params
        self.system = params.system
        self.history: list[dict[str, str]] = []
        self._read = read
        self._out = out or sys.stdout

    def run(self) -> None:
        console.print(
            f"[bold]{self.engine.name}[/bold] [dim]· {self.engine.kind} · /help for commands"
            " · /exit to leave[/dim]"
        )
        while True:
            try:
                line = self._read(">>> ")
            except (EOFError, KeyboardInterrupt):
                self._out.write("\n")
                return
            if not line.strip():
                continue
            if line.startswith("/"):
                if self._command(line.strip()):
                    return
                continue
            self._turn(line)

    def _command(self, line: str) -> bool:
        """Handle a slash command; True means leave."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit", "/bye"):
            return True
        if name == "/clear":
            self.history.clear()
            console.print("[dim]conversation cleared[/dim]")
        elif name == "/system":
            self.system = arg.strip() or None
            self.history.clear()
            console.print(
                f"[dim]system prompt {'set' if self.system else 'removed'}; conversation cleared[/dim]"
            )
        elif name in ("/help", "/?"):
            console.print(HELP, markup=False)
        else:
            console.print(f"unknown command {name}; /help lists them", markup=False)
        return False

    def _messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def _turn(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        params = self.params.model_copy(update={"system": None})
        try:
            reply, last = self.stream_reply(params)
        except LlmhostError as err:
            self.history.pop()
            console.print(f"[red]error:[/red] {err}", soft_wrap=True)
            return
        self.history.append({"role": "assistant", "content": reply})
        console.print(f"[dim]{stats_line(last)}[/dim]")

    def stream_reply(self, params: GenerationParams) -> tuple[str, Chunk]:
        """Stream one reply to the terminal; Ctrl-C (SIGINT) cancels it without leaving the chat."""
        request = GenerationRequest(self._messages(), params)
        chunks = self.engine.stream(request)
        restore = _on_sigint(request.cancel.set)
        parts: list[str] = []
        last: Chunk | None = None
        thinking = False
        try:
            for chunk in chunks:
                if chunk.reasoning:  # a thinking model's reasoning: dimmed, before the answer
                    self._out.write(("" if thinking else DIM) + chunk.reasoning)
                    thinking = True
                if chunk.text and thinking:
                    self._out.write(f"{UNDIM}\n\n")
                    thinking = False
                self._out.write(chunk.text)
                self._out.flush()
                parts.append(chunk.text)
                last = chunk
        finally:
            restore()
            if thinking:
                self._out.write(UNDIM)
        self._out.write("\n")
        assert last is not None
        return "".join(parts), last


# ANSI dim on and off (the reply streams as raw text, not through rich's markup)
DIM, UNDIM = "\x1b[2m", "\x1b[22m"


def stats_line(last: Chunk) -> str:
    bits = [f"{last.completion_tokens} tokens"]
    if last.decode_tps:
        bits.append(f"{last.decode_tps:.1f} tok/s")
    if last.ttft_s is not None:
        bits.append(f"first token {last.ttft_s:.2f} s")
    if last.finish_reason == "length":
        bits.append("stopped at max tokens")
    elif last.finish_reason == "cancelled":
        bits.append("stopped")
    if last.dropped_turns:
        bits.append(f"{last.dropped_turns} oldest messages left out to fit the context")
    return " · ".join(bits)


def _on_sigint(handler: Callable[[], None]) -> Callable[[], None]:
    """Route Ctrl-C to `handler` while a reply streams; returns the function that restores it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGINT, lambda *_: handler())
    return lambda: signal.signal(signal.SIGINT, previous)
