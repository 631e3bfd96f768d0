"""Hugging Face (and its mirrors) through `huggingface_hub`: listing with sizes and sha256,
its own transfer with retries, and a resumable partial file kept by llmhost."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmhost import portable
from llmhost.store.hubs.base import FileProgress, HubError, RemoteFile, is_transport_error
from llmhost.store.names import check_relative

HF_MIRROR = "https://hf-mirror.com"  # the well-known Hugging Face mirror in China


def _tqdm_class(progress: FileProgress, path: str) -> type:
    """A tqdm the hub library drives; it forwards byte counts to llmhost's own progress bars."""
    from tqdm.auto import tqdm

    class Forward(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            progress.start(path, kwargs.get("total"), int(kwargs.get("initial") or 0))

        def update(self, n: float | None = 1) -> bool | None:
            progress.advance(path, int(n or 0))
            return super().update(n)

    return Forward


class HuggingFaceHub:
    name = "hf"

    def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        self.token = token or os.environ.get("HF_TOKEN") or None

    def resolve(self, repo: str, revision: str) -> tuple[str, list[RemoteFile]]:
        from huggingface_hub import HfApi

        with self._errors(repo, revision):
            info = HfApi(endpoint=self.endpoint, token=self.token).model_info(
                repo, revision=revision, files_metadata=True
            )
        files = [
            RemoteFile(check_relative(s.rfilename), s.size, s.lfs.sha256 if getattr(s, "lfs", None) else None)
            for s in info.siblings or []
        ]
        return str(info.sha), files

    def download(self, repo: str, commit: str, file: RemoteFile, dest: Path, progress: FileProgress) -> Path:
        """One file through huggingface_hub's own transfer (`http_get`: retries, Range resume).

        The library deletes its temporary file when a process stops, so llmhost keeps the partial
        file itself (`.parts/<path>.part` in the staging folder) and hands its size back as
        `resume_size`: a pull killed or interrupted goes on from where it stopped.
        """
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        target = dest / file.path
        if target.exists() and file.size is not None and target.stat().st_size == file.size:
            return target  # done in an earlier run (it is verified again by the caller)
        part = dest / ".parts" / (file.path + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(repo, commit):
            url = hf_hub_url(repo, file.path, revision=commit, endpoint=self.endpoint)
            meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint)
            size = file.size if file.size is not None else meta.size
            resume = part.stat().st_size if part.exists() else 0
            if size is not None and resume > size:  # not a prefix of this file: start over
                part.unlink()
                resume = 0
            with open(part, "ab") as fh:
                http_get(
                    meta.location,
                    fh,
                    resume_size=resume,
                    headers=build_hf_headers(token=self.token),
                    expected_size=size,
                    tqdm_class=_tqdm_class(progress, file.path),
                )
        target.parent.mkdir(parents=True, exist_ok=True)
        portable.replace(part, target)
        return target

    @contextlib.contextmanager
    def _errors(self, repo: str, revision: str) -> Iterator[None]:
        """Hub library exceptions → one message a user can act on (disk errors pass through)."""
        try:
            yield
        except HubError:
            raise
        except Exception as err:
            mapped = translate_error(err, self, repo, revision)
            if mapped is err:
                raise
            raise mapped from err


def translate_error(err: Exception, hub: Any, repo: str, revision: str) -> Exception:
    from huggingface_hub import errors as hf_errors

    where = f"{hub.endpoint}"
    token_hint = (
        "set HF_TOKEN (or --token) to a token that has access"
        if hub.name == "hf"
        else ("set MODELSCOPE_API_TOKEN (or --token)")
    )
    if isinstance(err, hf_errors.GatedRepoError):
        return HubError(f"{repo} is gated: accept its license on the model page, then {token_hint}")
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return HubError(f"{repo} has no revision {revision!r}")
    if isinstance(err, hf_errors.RepositoryNotFoundError):
        return HubError(
            f"{repo} was not found on {where}, or it is private and needs a token: "
            f"check the id, or {token_hint}"
        )
    if isinstance(err, hf_errors.EntryNotFoundError):
        return HubError(f"a file of {repo} disappeared from {where} during the pull: {err}")
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return HubError(f"{where} refused access to {repo} ({status}): {token_hint}")
    if status == 404:
        return HubError(f"{repo} (revision {revision}) was not found on {where}")
    if is_transport_error(err) or isinstance(err, hf_errors.OfflineModeIsEnabled) or (status or 0) >= 500:
        detail = f"HTTP {status}" if status else f"{type(err).__name__}: {err}"
        return HubError(
            f"cannot download from {where} ({detail}). Check the network; in China try "
            "--mirror or --source modelscope. Run the same command again to resume"
        )
    if isinstance(err, OSError):
        return err  # disk errors are handled by the caller
    return HubError(f"download from {where} failed: {type(err).__name__}: {err}")
