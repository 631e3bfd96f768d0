"""llmhost: local chat models from one command, on a laptop CPU or a GPU cluster."""

__version__ = "0.6.0"
