"""Writing a prompt set as one unit: a reader sees the old complete set or the new one, never a mix.

A set is several files in several folders (`soft_prompts.json`, each prompt's adapter and card),
and no file system renames several files at once. So a save
1. takes the directory's lock (exclusive: concurrent writers, threads or processes, take turns; a
   file named after the directory's real path in the system's temporary folder, so the saved set
   holds no lock file),
2. writes every file to a temporary name beside its target and syncs it (a crash here leaves the old
   set untouched),
3. writes the list of renames to a journal, `.soft_prompts.pending.json` (the commit point),
4. renames each temporary file over its target, then deletes the journal.

A crash during step 4 leaves the journal and the temporary files not yet renamed: whoever opens
the directory next (a reader, through `reading`, or a writer) finishes the renames first, so the
set is the new one, complete. Readers hold the lock shared while they read, so a save in progress
never changes a set under them. The lock serves the processes of one machine; where it cannot be
taken (a system without `fcntl`) reading and writing go on without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; saves are still atomic per file
    fcntl = None  # type: ignore[assignment]

JOURNAL_NAME = ".soft_prompts.pending.json"
_TMP_SUFFIX = ".tmp"


def commit_files(root: str, writers: dict[str, Callable[[str], None]], remove: tuple[str, ...] = ()) -> None:
    """For each `{path: write}`, `write(tmp_path)`; then put every file in place as one unit, and
    delete the paths in `remove` (e.g. an index that no longer holds). Paths lie under `root`."""
    with _locked(root, exclusive=True) as locked:
        if locked:
            _finish_interrupted_commit(root)
            _remove_stale_temporaries(root, JOURNAL_NAME[1:])  # a journal whose writer died mid-write
        temporary: dict[str, str] = {}
        committed = False
        try:
            for path, write in writers.items():
                directory = os.path.dirname(os.path.abspath(path))
                if locked:  # only under the lock: another writer's temporaries are never ours to remove
                    _remove_stale_temporaries(directory, os.path.basename(path))
                tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0666 & ~umask
                temporary[path] = tmp
                mode = os.stat(tmp).st_mode & 0o777
                write(tmp)
                os.chmod(tmp, mode)  # a writer may have replaced the file with one of its own (safetensors: 0600)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            journal = {"renames": [[os.path.relpath(tmp, root), os.path.relpath(path, root)]
                                   for path, tmp in temporary.items()],
                       "remove": [os.path.relpath(path, root) for path in remove]}
            _write_journal(root, journal)
            committed = True
            _finish_interrupted_commit(root)
        finally:
            if not committed:  # failed before the commit point: the old set stands
                for tmp in temporary.values():
                    if os.path.exists(tmp):
                        os.remove(tmp)


@contextlib.contextmanager
def reading(root: str | os.PathLike) -> Iterator[None]:
    """Hold `root`'s lock shared while a set is read there, after finishing a save a crash
    interrupted (which needs the lock exclusive for a moment)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        yield
        return
    if os.path.exists(os.path.join(root, JOURNAL_NAME)):
        with _locked(root, exclusive=True):
            _finish_interrupted_commit(root)
    with _locked(root, exclusive=False):
        yield


def _finish_interrupted_commit(root: str) -> None:
    """Do the renames a journal lists (those whose temporary file is still there), then delete it."""
    path = os.path.join(root, JOURNAL_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            journal = json.load(f)
    except FileNotFoundError:
        return
    except (json.JSONDecodeError, UnicodeDecodeError):
        os.remove(path)  # a journal that was never complete: its commit never began
        return
    for tmp, target in journal.get("renames", []):
        tmp, target = os.path.join(root, tmp), os.path.join(root, target)
        if os.path.exists(tmp):
            os.replace(tmp, target)
    for gone in journal.get("remove", []):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(root, gone))
    for directory in {os.path.dirname(os.path.join(root, t)) for _, t in journal.get("renames", [])} | {root}:
        _fsync_directory(directory)
    os.remove(path)
    _fsync_directory(root)


def _write_journal(root: str, journal: dict) -> None:
    tmp = os.path.join(root, f"{JOURNAL_NAME}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(journal, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, JOURNAL_NAME))
    _fsync_directory(root)


@contextlib.contextmanager
def _locked(root: str, exclusive: bool) -> Iterator[bool]:
    """`root`'s advisory lock, held for the block; yields whether it is held (False where it cannot
    be taken)."""
    if fcntl is None:
        yield False
        return
    key = hashlib.sha256(os.path.realpath(root).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    try:
        directory = os.path.join(tempfile.gettempdir(), "hf_softprompt_locks")
        os.makedirs(directory, exist_ok=True)
        fd = os.open(os.path.join(directory, f"{key}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # no writable temporary folder
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _remove_stale_temporaries(directory: str, name: str) -> None:
    prefix = f".{name}."
    for entry in os.listdir(directory):
        if entry.startswith(prefix) and entry.endswith(_TMP_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, entry))


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
