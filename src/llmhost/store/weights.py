"""Safetensors files checked before any library reads them: a header length that a damaged or
forged file claims (up to 2**64 bytes) is compared with the file's size first, so it ends in a
one-line error that names the file, never a MemoryError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmhost.errors import DamagedModelError

#: safetensors' own limit on the JSON header (the library refuses larger ones too)
MAX_HEADER = 100_000_000


def safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names → dtype, shape, offsets)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little")
            if len(head) < 8 or length > min(size - 8, MAX_HEADER):
                raise _damaged(file, f"its header claims {length} bytes; the file has {size}")
            header = json.loads(fh.read(length))
    except OSError as err:
        raise DamagedModelError(f"cannot read {file}: {err.strerror}") from None
    except ValueError as err:
        raise _damaged(file, f"its header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise _damaged(file, "its header is not a JSON object")
    return header


def check_safetensors(*files: Path) -> None:
    """Raise the one-line error for the first file whose header cannot be read."""
    for file in files:
        safetensors_header(file)


def _damaged(file: Path, detail: str) -> DamagedModelError:
    return DamagedModelError(
        f"{file} could not be read as safetensors weights ({detail}): it is damaged or incomplete; "
        "copy or download it again"
    )
