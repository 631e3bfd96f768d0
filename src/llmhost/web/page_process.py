"""`python -m llmhost.web.page_process run APP ...`: Streamlit's own command line, in a process
that ends when llmhost does on every OS (Linux's death signal has no macOS or Windows twin, so
there the page watches its launcher: `portable.watch_parent`)."""

from __future__ import annotations

from llmhost.portable import watch_parent


def main() -> None:
    watch_parent()
    from streamlit.web.cli import main as streamlit

    streamlit(prog_name="streamlit")


if __name__ == "__main__":
    main()
