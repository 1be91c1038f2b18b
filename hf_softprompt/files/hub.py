"""Hub transport: push chosen files in one commit, download files by repo id, and turn Hub failures
into `HubError`s that name the repo, the HTTP status and what to check.

Knows nothing about adapters (save.py says which files); only talks to huggingface_hub.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from huggingface_hub import CommitInfo, HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

logger = logging.getLogger(__name__)

# huggingface_hub raises HfHubHTTPError for HTTP answers, but a refused connection or a timeout
# arrives as its transport's base error (httpx/httpx2 `HTTPError`), which HfHubHTTPError derives from.
_TRANSPORT_ERRORS = tuple(c for c in HfHubHTTPError.__bases__ if c is not OSError)
HUB_ERRORS: tuple[type[BaseException], ...] = (OSError, *_TRANSPORT_ERRORS)

_push_executor: ThreadPoolExecutor | None = None  # one worker: background pushes land in order


class HubError(OSError):
    """A Hub request failed. `status` is the HTTP status, or None when the Hub was not reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def push_files(
    files: Mapping[str, str | os.PathLike | bytes],
    repo_id: str,
    *,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    create_repo: bool = True,
    run_as_future: bool = False,
    note: str = "Nothing local was changed: run the push again once fixed.",
) -> CommitInfo | Future:
    """Upload exactly `files` (`{path in repo: local file or bytes}`) to `repo_id` in one commit.

    The files are copied into a temporary folder first, so the commit holds what they were at call
    time even when it runs in the background (`run_as_future=True`), and nothing else in their
    folders is ever uploaded. The repo is created when missing (`create_repo=True`, which also
    fails fast, without retries, when the Hub cannot be reached).

    Raises:
        HubError: naming the repo, the HTTP status and what to check. The local files are untouched:
            run the push again once fixed.
    """
    staging = tempfile.mkdtemp(prefix="hf-softprompt-push-")
    try:
        for path_in_repo, source in files.items():
            target = os.path.join(staging, path_in_repo)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if isinstance(source, bytes):
                with open(target, "wb") as f:
                    f.write(source)
            else:
                shutil.copyfile(source, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    args = (staging, repo_id, token, revision, commit_message, private, create_pr, create_repo, note)
    if not run_as_future:
        return _upload_staged(*args)
    global _push_executor
    if _push_executor is None:
        _push_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-softprompt-push")
    future = _push_executor.submit(_upload_staged, *args)
    future.add_done_callback(_log_failed_push)
    return future


def download_files(
    repo_id: str,
    groups: Sequence[Sequence[str]],
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    subfolder: str | None = None,
    note: str = "",
    optional: bool = False,
) -> list[str]:
    """Download one file per group from `repo_id` into the Hub cache; returns the local paths.

    Each group lists alternatives in order of preference (`["a.safetensors", "a.bin"]`): the first
    one the repo holds is taken. Online, one `model_info` call (never retried, so an unreachable Hub
    fails at once) checks the repo, the revision and the file list; when it cannot reach the Hub,
    and with `HF_HUB_OFFLINE=1` or `local_files_only=True`, files come from the local cache.
    `note` is added to error messages. With `optional=True` a group the repo (or, offline, the
    cache) does not hold is left out of the result instead of raising.
    """
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    use_cache_only = local_files_only or constants.HF_HUB_OFFLINE
    available: set[str] | None = None  # the repo's files, when the Hub answered
    unreachable: BaseException | None = None
    if not use_cache_only:
        try:
            info = HfApi(token=token).model_info(repo_id, revision=revision,
                                                 timeout=constants.HF_HUB_ETAG_TIMEOUT)
            available = {s.rfilename for s in info.siblings or []}
        except HfHubHTTPError as err:
            raise hub_error(err, f"download the adapter from {where}", note) from err
        except HUB_ERRORS as err:  # unreachable: what the cache holds may still do
            logger.warning("Could not reach %s (%s); trying the local cache.", constants.ENDPOINT, err)
            use_cache_only, unreachable = True, err
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    paths = []
    for group in groups:
        names = list(group) if available is None else [n for n in group if prefix + n in available]
        if not names and optional:
            continue
        if not names:
            raise HubError(f"{where} holds none of {[prefix + n for n in group]}. Check the repo id "
                           "and that it holds a soft-prompt (PEFT prompt-learning) adapter.", 404)
        for i, name in enumerate(names):
            try:
                paths.append(hf_hub_download(
                    repo_id, name, subfolder=subfolder, revision=revision, token=token,
                    cache_dir=None if cache_dir is None else os.fspath(cache_dir),  # typed str | Path only
                    force_download=force_download, local_files_only=use_cache_only,
                    library_name="hf-softprompt"))
                break
            except LocalEntryNotFoundError as err:
                if i + 1 < len(names):
                    continue  # the next alternative may be cached
                if optional:
                    break
                if unreachable is not None:
                    raise hub_error(unreachable, f"download {name!r} from {where}",
                                    note=f"It is not in the local cache either. {note}") from unreachable
                raise hub_error(err, f"load {name!r} of {where} from the local cache", note) from err
            except HUB_ERRORS as err:
                raise hub_error(err, f"download {name!r} from {where}", note) from err
            except ValueError as err:  # huggingface_hub wraps a failed forced download in a ValueError
                cause = err.__cause__ or err.__context__
                if not isinstance(cause, HUB_ERRORS):
                    raise
                raise hub_error(cause, f"download {name!r} from {where}", note) from err
    return paths


def hub_error(err: BaseException, action: str, note: str = "") -> HubError:
    """A `HubError` saying what failed (`action`), the HTTP status, and what to check."""
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(err, GatedRepoError):
        hint = "the repo is gated: accept its conditions on the Hub and use a token that has access"
    elif isinstance(err, RepositoryNotFoundError):
        hint = "no such repo: check the repo id, or pass token= (or set HF_TOKEN) if it is private"
    elif isinstance(err, RevisionNotFoundError):
        hint = "no such revision: check the branch, tag or commit id"
    elif isinstance(err, RemoteEntryNotFoundError):
        hint = "the repo has no such file"
    elif status in (401, 403):
        hint = ("the token was refused: check token=, HF_TOKEN or `hf auth login`, and that the token "
                "may write to this repo when pushing")
    elif status == 429:
        hint = "rate limited by the Hub: wait a little and retry"
    elif status is not None and status >= 500:
        hint = "the Hub had a server error: retry in a moment"
    elif isinstance(err, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        hint = ("not in the local cache and Hub access is off (HF_HUB_OFFLINE=1 or local_files_only=True): "
                "download it once online, or pass a local directory")
    elif status is None:
        hint = (f"could not reach the Hub at {constants.ENDPOINT}: check the network, HF_ENDPOINT and "
                "proxy settings, or set HF_HUB_OFFLINE=1 to use cached files only")
    else:
        hint = "the Hub refused the request"
    code = f" (HTTP {status})" if status is not None else ""
    message = f"Could not {action}{code}: {hint}. {note} Cause: {type(err).__name__}: {err}"
    return HubError(" ".join(message.split()), status)


def _upload_staged(staging: str, repo_id: str, token: str | None, revision: str | None,
                   commit_message: str | None, private: bool | None, create_pr: bool,
                   create_repo: bool, note: str) -> CommitInfo:
    try:
        api = HfApi(token=token)
        if create_repo:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.upload_folder(
            repo_id=repo_id, folder_path=staging, commit_message=commit_message or "Upload soft prompt",
            revision=revision, create_pr=create_pr)
    except HUB_ERRORS as err:
        where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
        raise hub_error(err, f"push to {where}", note=note) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _log_failed_push(future: Future) -> None:
    # Background pushes (Trainer checkpoints) must not stop training; say what failed instead.
    if not future.cancelled() and future.exception() is not None:
        logger.warning("Background push failed: %s", future.exception())
