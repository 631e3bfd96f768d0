"""Chat templates, rendered one way for every engine that tokenizes: transformers' sandboxed
Jinja environment (no file or attribute access beyond what templates are allowed), the model's
special tokens as variables (`bos_token`, `eos_token`, ...), and one error shape."""

from __future__ import annotations

from collections.abc import Mapping

from llmhost.engine.context import Message
from llmhost.errors import ChatTemplateError


class ChatTemplate:
    def __init__(self, source: str | None, model: str, special_tokens: Mapping[str, object]) -> None:
        self.source = source or None
        self.model = model
        #: What templates see besides the messages, as transformers' apply_chat_template passes it.
        self.variables = {k: v for k, v in special_tokens.items() if isinstance(v, str | list)}

    def render(self, messages: list[Message]) -> str:
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        if self.source is None:
            raise ChatTemplateError(
                f"the model {self.model} has no chat template: pass --chat-template FILE "
                "(a Jinja file), or send a plain prompt instead of messages"
            )
        try:
            rendered, _ = render_jinja_template(
                conversations=[messages],
                chat_template=self.source,
                add_generation_prompt=True,
                **self.variables,
            )
        except TemplateError as err:
            raise ChatTemplateError(f"the chat template refused these messages: {err}") from None
        return rendered[0]
