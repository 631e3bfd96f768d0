"""The wire protocols the server speaks, one file each: a body model, its `GenerationRequest`,
and the reply rendered back. Adding a protocol is a file here plus its entry below."""

from llmhost.server.protocols.anthropic_messages import Messages
from llmhost.server.protocols.base import Defaults, Protocol, Reply, openai_error
from llmhost.server.protocols.openai_chat import ChatCompletions
from llmhost.server.protocols.openai_completions import Completions
from llmhost.server.protocols.openai_responses import Responses

#: Every protocol the API serves (build_server routes each at its path).
PROTOCOLS: tuple[type[Protocol], ...] = (ChatCompletions, Completions, Messages, Responses)


def make_protocols(responses_kept: int) -> tuple[Protocol, ...]:
    """One server's protocols (the Responses store lives as long as its server)."""
    return ChatCompletions(), Completions(), Messages(), Responses(responses_kept)


def protocol_at(path: str) -> type[Protocol] | None:
    """The protocol whose path `path` is or lies under (its errors take that protocol's shape)."""
    return next((p for p in PROTOCOLS if path == p.path or path.startswith(p.path + "/")), None)


__all__ = ["PROTOCOLS", "Defaults", "Protocol", "Reply", "make_protocols", "openai_error", "protocol_at"]
