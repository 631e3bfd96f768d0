"""Model hubs behind one small interface (`base.Hub`), each through its own client library for
listing, transfer, resume and their checks. Imports of those libraries are lazy (the CLI starts
fast)."""

from __future__ import annotations

from llmhost.store.hubs.base import FileProgress, Hub, HubError, RemoteFile, is_transport_error
from llmhost.store.hubs.huggingface import HF_MIRROR, HuggingFaceHub
from llmhost.store.hubs.modelscope import ModelScopeHub

__all__ = [
    "HF_MIRROR",
    "FileProgress",
    "Hub",
    "HubError",
    "HuggingFaceHub",
    "ModelScopeHub",
    "RemoteFile",
    "is_transport_error",
    "make_hub",
]


def make_hub(source: str, endpoint: str | None, token: str | None, mirror: bool) -> Hub:
    if source == "hf":
        return HuggingFaceHub(HF_MIRROR if mirror and not endpoint else endpoint, token)
    return ModelScopeHub(endpoint, token)
