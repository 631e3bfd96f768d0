"""The browser chat page (`llmhost web`): a Streamlit client of the OpenAI-compatible API.

The page holds no model: every request goes through the official `openai` client to a server
(a private `llmhost serve` child, or any endpoint given with `--server`).
"""
