"""The wire protocols the server speaks, one file each: a body model, its `GenerationRequest`,
and the reply rendered back. Adding a protocol is a file here plus its entry below."""

from llmhost.server.protocols.base import Defaults, Protocol, Reply
from llmhost.server.protocols.openai_chat import ChatCompletions
from llmhost.server.protocols.openai_completions import Completions

#: Every protocol the API serves (build_server routes each at its path).
PROTOCOLS: tuple[Protocol, ...] = (ChatCompletions(), Completions())

__all__ = ["PROTOCOLS", "Defaults", "Protocol", "Reply"]
