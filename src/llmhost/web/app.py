"""Streamlit entry script: `streamlit run` executes this file on every interaction."""

from llmhost.web.page import main

main()
