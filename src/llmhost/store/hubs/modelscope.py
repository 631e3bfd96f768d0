"""ModelScope (魔搭) through its own client library, `modelscope` (the `modelscope_hub` API):
listing with sizes and sha256, ranged resumable downloads, its own integrity checks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmhost.store.hubs.base import FileProgress, HubError, RemoteFile, is_transport_error
from llmhost.store.names import check_relative

DEFAULT_ENDPOINT = "https://www.modelscope.cn"


class ModelScopeHub:
    name = "modelscope"

    def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
        url = endpoint or os.environ.get("MODELSCOPE_DOMAIN") or DEFAULT_ENDPOINT
        self.endpoint = (url if url.startswith(("http://", "https://")) else "https://" + url).rstrip("/")
        self.token = token or os.environ.get("MODELSCOPE_API_TOKEN") or None

    def _api(self) -> Any:
        from modelscope_hub import HubApi

        return HubApi(endpoint=self.endpoint, token=self.token)

    def resolve(self, repo: str, revision: str) -> tuple[str, list[RemoteFile]]:
        with self._errors(repo, revision):
            listing = self._api().list_repo_files(repo, "model", revision=revision)
        files = [
            RemoteFile(check_relative(f.path), f.size, f.sha256)
            for f in listing
            if (f.type or "blob") == "blob"
        ]
        return revision, files  # ModelScope names revisions by branch or tag; pin one with --revision

    def download(self, repo: str, commit: str, file: RemoteFile, dest: Path, progress: FileProgress) -> Path:
        progress.start(file.path, file.size, 0)
        with self._errors(repo, commit):
            got = self._api().download_file(
                repo,
                "model",
                file.path,
                revision=commit,
                local_dir=dest,
                expected_sha256=file.sha256,
                file_size=file.size,
            )
        return Path(got)

    @contextlib.contextmanager
    def _errors(self, repo: str, revision: str) -> Iterator[None]:
        from modelscope_hub import errors as ms

        try:
            yield
        except (HubError, KeyboardInterrupt):
            raise
        except (ms.AuthenticationError, ms.PermissionDeniedError) as err:
            raise HubError(
                f"{self.endpoint} refused access to {repo}: log in to ModelScope, accept the model's "
                "terms if it has any, and set MODELSCOPE_API_TOKEN (or --token)"
            ) from err
        except ms.NotExistError as err:
            raise HubError(
                f"{repo} (revision {revision}) was not found on {self.endpoint}: check the id"
            ) from err
        except ms.FileIntegrityError as err:
            raise HubError(
                f"a file of {repo} kept failing its check ({err}); nothing was added to the store"
            ) from err
        except Exception as err:
            if (
                isinstance(err, OSError)
                and not is_transport_error(err)
                and not isinstance(err, ms.NetworkError)
            ):
                raise  # disk errors are handled by the caller
            if isinstance(err, ms.NetworkError) or is_transport_error(err) or isinstance(err, ms.ServerError):
                raise HubError(
                    f"cannot download from {self.endpoint} ({type(err).__name__}: {err}). Check the network, "
                    "or try --source hf --mirror. Run the same command again to resume"
                ) from err
            raise HubError(f"download from {self.endpoint} failed: {type(err).__name__}: {err}") from err
