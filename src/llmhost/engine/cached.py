"""Folders built once into the llmhost home (`converted/`: GGUF and Qwen-1 conversions): built in
a temporary folder claimed up front and renamed into place when complete, so a crash at any
point leaves only a temporary folder (swept once its process is gone), never one that loads."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from llmhost import portable

COMPLETE_MARKER = "llmhost-converted.json"
TMP_PREFIX = ".tmp-"


def build_once(
    target: Path,
    build: Callable[[Path], None],
    source: Path,
    read_error: Callable[[str], Exception],
    keep: tuple[type[BaseException], ...] = (),
) -> Path:
    """`target`, built first by `build(tmp)` unless complete. An exception from reading the
    source becomes `read_error(detail)`; OSError (the disk's) and `keep` pass through as they are."""
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target.parent)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()  # claimed up front, so a crash at any point leaves only this temp folder
    try:
        try:
            build(tmp)
        except (OSError, *keep):
            raise  # the disk (full, unreadable), or an error that already says what to do
        except Exception as err:  # a truncated file fails in struct, numpy, safetensors, json...
            raise read_error(f"{type(err).__name__}: {err}".splitlines()[0]) from None
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(source), "converted_at": time.time()}))
        if target.exists():  # an incomplete leftover from an older llmhost, or a lost race
            if (target / COMPLETE_MARKER).is_file():
                return target
            shutil.rmtree(target)
        portable.replace(tmp, target)
    except OSError:
        if (target / COMPLETE_MARKER).is_file():  # another process finished first
            return target
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_tmp(cache_root: Path) -> None:
    """Remove temporary folders left by builds whose process is gone (killed, crashed)."""
    for tmp in cache_root.glob(f"{TMP_PREFIX}*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not portable.pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
