"""Chat templates that never finish or recurse without end: the render stops within its budget
(in the thread that runs it: nothing keeps spinning afterwards) and says so in one line."""

from __future__ import annotations

import threading
import time

import pytest

from llmhost.engine.template import ChatTemplate
from llmhost.errors import ChatTemplateError

HELLO = [{"role": "user", "content": "hi"}]
BUDGET = 1.0

LOOPS = {
    # the template's own loops
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    # loops that run inside Jinja's filters (Python code outside the template's own)
    "filters": "{% for i in range(1000) %}"
    "{{ (range(100000)|list * 100)|select('odd')|list|length }}{% endfor %}",
    "macro": "{% macro f() %}{% for i in range(100000) %}{{ i }}{% endfor %}{% endmacro %}"
    "{% for i in range(100000) %}{{ f()|length }}{% endfor %}",
}


@pytest.mark.parametrize("source", LOOPS.values(), ids=LOOPS.keys())
def test_a_template_that_loops_too_long_stops_within_its_budget(source) -> None:
    template = ChatTemplate(source, "looping", {}, budget_s=BUDGET)
    outcome: dict[str, object] = {}

    def render() -> None:
        try:
            template.render(HELLO)
        except ChatTemplateError as err:
            outcome["error"] = str(err)

    worker = threading.Thread(target=render, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(BUDGET + 10)
    assert not worker.is_alive(), "the render is still running after its budget"
    assert time.monotonic() - started < BUDGET + 5
    assert "did not finish rendering within 1 s" in str(outcome.get("error")), outcome


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("{% for i in range(9) recursive %}{{ loop(range(9)) }}{% endfor %}", "RecursionError"),
        ("{{ range(10**9)|length }}", "OverflowError: Range too big"),  # the sandbox's own limit
        ("{{ messages[0].content + 1 }}", "TypeError"),  # an operation these messages cannot take
    ],
)
def test_a_template_that_fails_on_the_messages_is_one_error(source, error) -> None:
    with pytest.raises(ChatTemplateError, match=f"failed on these messages \\({error}"):
        ChatTemplate(source, "failing", {}).render(HELLO)


def test_a_template_within_its_budget_renders() -> None:
    template = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", "m", {})
    assert template.render(HELLO) == "user: hi\n"
