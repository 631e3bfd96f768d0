"""Errors a user can act on. Every message says what went wrong and what to do next."""


class LlmhostError(Exception):
    """Base class: front ends print `str(err)` as is (CLI) or map it to an HTTP status (server)."""

    #: HTTP status a server front end should use; CLI front ends ignore it.
    status: int = 500
    #: OpenAI-style error type.
    kind: str = "server_error"


class InvalidRequestError(LlmhostError, ValueError):
    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextOverflowError(InvalidRequestError):
    """The prompt plus the requested new tokens do not fit into the model's context window."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length
        if max_new_tokens <= 1:  # the reply's length was a ceiling: the prompt alone is too long
            message = (
                f"the prompt is {prompt_tokens} tokens, which leaves no room for a reply in the model's "
                f"context window of {context_length} tokens: shorten the messages (a coding agent: "
                "its flags for a short system prompt and fewer tools), or serve a longer --context-length"
            )
        else:
            message = (
                f"the prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}, "
                f"{prompt_tokens + max_new_tokens} in all, but the model's context window is "
                f"{context_length} tokens: shorten the message or lower max_new_tokens"
            )
        super().__init__(message, param="messages")


class NotSupportedError(LlmhostError):
    """What the server or engine in use does not do (the request itself is well formed)."""

    status = 501
    kind = "not_supported_error"


class ModelNotFoundError(LlmhostError):
    status = 404
    kind = "invalid_request_error"


class ChatTemplateError(LlmhostError):
    status = 400
    kind = "invalid_request_error"


class EmbeddedModelMissingError(LlmhostError):
    status = 500


class DamagedModelError(LlmhostError):
    """A model file is truncated or corrupt (an interrupted copy, a bad disk, a partial download)."""
