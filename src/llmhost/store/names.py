"""Names and relative paths that come from users or hubs, checked before they touch the disk.

Nothing a user types or a hub sends may make a path escape the store: no `..`, no absolute
paths, no backslashes, no drive letters, no empty or hidden segments.
"""

from __future__ import annotations

import re

from llmhost.errors import InvalidRequestError

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def check_name(name: str) -> str:
    """A store name: `name` or `owner/name` (a hub id), each segment [A-Za-z0-9._+-]."""
    parts = name.split("/")
    if len(parts) > 2 or not all(_SEGMENT.match(p) and ".." not in p for p in parts):
        raise InvalidRequestError(
            f"invalid model name {name!r}: use letters, digits, '.', '_', '-' (and one '/' as in "
            "owner/name), starting with a letter or digit"
        )
    return name


def folder_name(name: str) -> str:
    """The store folder of a name: `owner/name` → `owner--name` (one level, never nested)."""
    return check_name(name).replace("/", "--")


def check_relative(path: str) -> str:
    """A file path inside a repository, as a hub lists it."""
    bad = (
        not path
        or path.startswith(("/", "~"))
        or "\\" in path
        or "\x00" in path
        or re.match(r"^[A-Za-z]:", path) is not None
        or any(seg in ("", ".", "..") for seg in path.split("/"))
    )
    if bad:
        raise InvalidRequestError(f"refusing the file path {path!r} from the hub: it could escape the store")
    return path
