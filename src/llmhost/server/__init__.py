"""The OpenAI-compatible HTTP API: `create_app(manager, settings)` and `serve()`."""
