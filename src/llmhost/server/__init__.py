"""The OpenAI-compatible HTTP API: `create_app(pool, settings)` and `serve()`."""
