"""A local, in-memory stand-in for the Hugging Face Hub HTTP API, for tests.

The real ``huggingface_hub`` client is pointed at it through ``HF_ENDPOINT`` (and the module
constants that ``huggingface_hub`` computes from it at import time, see
:func:`patch_hf_client`). Only the subset of the Hub API needed to create repos, commit files
(non-LFS, base64 inline in the commit NDJSON) and download them is implemented::

    GET    /api/whoami-v2
    POST   /api/repos/create                       (409 if the repo exists, like the Hub)
    DELETE /api/repos/delete
    POST   /api/validate-yaml                      (README.md metadata check: always valid)
    GET    /api/agent-harnesses                    (client agent-detection registry: empty)
    GET    /api/{type}s/{repo_id}                  (repo_info / model_info)
    GET    /api/{type}s/{repo_id}/revision/{rev}
    GET    /api/{type}s/{repo_id}/tree/{rev}[/{path}]   (?recursive=true)
    POST   /api/{type}s/{repo_id}/paths-info/{rev}
    GET    /api/{type}s/{repo_id}/commits/{rev}     (list_repo_commits)
    GET    /api/{type}s/{repo_id}/refs              (list_repo_refs)
    POST   /api/{type}s/{repo_id}/branch/{branch}   (create_branch; DELETE = delete_branch)
    POST   /api/{type}s/{repo_id}/preupload/{rev}   (every file -> uploadMode "regular")
    POST   /api/{type}s/{repo_id}/commit/{rev}      (NDJSON: header/file/lfsFile/deletedFile/deletedFolder;
                                                     ?create_pr=1 opens refs/pr/N)
    HEAD   /[{type}s/]{repo_id}/resolve/{rev}/{path}
    GET    /[{type}s/]{repo_id}/resolve/{rev}/{path}   (Range supported)

No Xet headers are ever sent, so downloads always take the plain HTTP path.

Usage::

    def test_something(hub_server):          # fixture defined below
        HfApi().create_repo("user/repo")
        ...
        assert hub_server.files("user/repo") == {...}
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = ["LocalHubServer", "HubCommit", "TEST_TOKEN", "TEST_USER", "patch_hf_client", "hub_server"]

TEST_TOKEN = "hf_local_hub_test_token"
TEST_USER = "test-user"

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
# Sub-routes that can follow a repo id under /api/{type}s/{repo_id}/...
_REPO_ACTIONS = {"revision", "tree", "preupload", "commit", "paths-info", "commits", "refs", "branch"}
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def git_blob_sha1(data: bytes) -> str:
    """Git blob id of ``data`` (what the Hub uses as oid / ETag of regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """Raised inside request handlers; turned into a Hub-like JSON error response."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: dict | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}
        self.extra = extra or {}  # additional fields of the JSON error body


@dataclass
class HubCommit:
    oid: str
    parent: str | None
    message: str
    description: str
    files: dict[str, bytes]
    date: datetime = field(default_factory=_now)

    def as_dict(self) -> dict[str, Any]:
        return {
            "oid": self.oid,
            "parent": self.parent,
            "message": self.message,
            "description": self.description,
        }


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: datetime = field(default_factory=_now)
    branches: dict[str, str] = field(default_factory=dict)  # branch name (incl. refs/pr/N) -> commit oid
    commits: dict[str, HubCommit] = field(default_factory=dict)
    next_pr: int = 1

    @property
    def url_path(self) -> str:
        return _URL_PREFIX[self.repo_type] + self.repo_id


@dataclass
class _FailureRule:
    remaining: int
    status: int
    method: str | None
    path_contains: str | None

    def matches(self, method: str, path: str) -> bool:
        if self.remaining <= 0:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if self.path_contains is not None and self.path_contains not in path:
            return False
        return True


class LocalHubServer:
    """Threaded in-memory Hub server bound to ``127.0.0.1`` on a free port.

    Attributes tests may set:
        require_token: ``None`` (default: no auth check), a token string, or an iterable of accepted tokens.
            When set, every request whose ``Authorization: Bearer <token>`` is missing or not accepted gets a
            401 ``{"error": "Invalid credentials in Authorization header"}``.
        username: namespace used for ``create_repo("name")`` without an explicit namespace, and by ``whoami``.
    """

    def __init__(self, *, require_token: str | Iterable[str] | None = None, username: str = TEST_USER):
        self.require_token = require_token
        self.username = username
        self.requests: list[tuple[str, str, int]] = []  # (method, path without query, status)
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lfs_store: dict[str, bytes] = {}  # sha256 -> content of every file ever committed
        self._failures: list[_FailureRule] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalHubServer:
        if self._httpd is not None:
            return self
        handler = type("_BoundHubHandler", (_HubRequestHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="local-hub-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ test helpers

    def fail_next(
        self, n: int = 1, status: int = 500, method: str | None = None, path_contains: str | None = None
    ) -> None:
        """Answer the next ``n`` requests matching ``method``/``path_contains`` with ``status``.

        The error has a JSON body like the Hub's (``{"error": ...}``); afterwards requests behave normally.
        """
        with self._lock:
            self._failures.append(_FailureRule(n, status, method, path_contains))

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> None:
        """Create a repo directly (no HTTP), with its 'initial commit' (no files). No-op if it exists."""
        with self._lock:
            if (repo_type, repo_id) not in self._repos:
                self._new_repo(repo_type, repo_id, private)

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes | str],
        *,
        message: str = "seed",
        repo_type: str = "model",
        revision: str = "main",
        delete: Iterable[str] = (),
    ) -> str:
        """Seed content directly (no HTTP). Creates the repo if needed. Returns the new commit oid."""
        with self._lock:
            self.create_repo(repo_id, repo_type=repo_type)
            repo = self._repos[(repo_type, repo_id)]
            head = repo.branches[revision]
            new_files = dict(repo.commits[head].files)
            for path in delete:
                new_files.pop(path, None)
            for path, content in files.items():
                new_files[path] = content.encode() if isinstance(content, str) else bytes(content)
            return self._commit(repo, revision, new_files, message, "").oid

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Snapshot ``{path: bytes}`` of the repo at ``revision`` (branch name or commit oid)."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return dict(repo.commits[self._resolve(repo, revision)].files)

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict[str, Any]]:
        """History of ``revision``, oldest first (the first one is the repo's 'initial commit').

        Each item: ``{"oid", "parent", "message", "description"}``.
        """
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return [c.as_dict() for c in reversed(self._history(repo, self._resolve(repo, revision)))]

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            return dict(self._get_repo(repo_type, repo_id).branches)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return self._resolve(repo, revision)

    def reset(self) -> None:
        """Drop all repos, pending failures and the request log."""
        with self._lock:
            self._repos.clear()
            self._lfs_store.clear()
            self._failures.clear()
            self.requests.clear()

    # ------------------------------------------------------------------ storage internals

    def _new_sha(self, *parts: str) -> str:
        seed = "\0".join([*parts, str(next(self._counter)), _now().isoformat()])
        return hashlib.sha1(seed.encode()).hexdigest()

    def _new_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private)
        oid = self._new_sha(repo_type, repo_id, "initial commit")
        repo.commits[oid] = HubCommit(
            oid=oid, parent=None, message="initial commit", description="", files={}
        )
        repo.branches["main"] = oid
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _commit(
        self, repo: _Repo, branch: str, files: dict[str, bytes], message: str, description: str
    ) -> HubCommit:
        parent = repo.branches[branch]
        oid = self._new_sha(repo.repo_id, parent, message)
        commit = HubCommit(oid=oid, parent=parent, message=message, description=description, files=files)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        for content in files.values():
            self._lfs_store.setdefault(hashlib.sha256(content).hexdigest(), content)
        return commit

    def _history(self, repo: _Repo, oid: str) -> list[HubCommit]:
        out = []
        cur: str | None = oid
        while cur is not None:
            commit = repo.commits[cur]
            out.append(commit)
            cur = commit.parent
        return out  # newest first

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        rev = revision.lower()
        if 7 <= len(rev) < 40 and all(c in "0123456789abcdef" for c in rev):
            matches = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # ------------------------------------------------------------------ request handling

    def _handle(self, req: _HubRequestHandler) -> tuple[int, dict[str, str], bytes]:
        """Returns (status, headers, body). Never raises."""
        method = req.command
        split = urlsplit(req.path)
        raw_path = split.path
        query = parse_qs(split.query, keep_blank_values=True)
        segs = [s for s in raw_path.strip("/").split("/")]

        try:
            if raw_path == "/api/agent-harnesses" and method == "GET":
                # Fetched once per process by huggingface_hub's agent detection. Exempt from auth/failures.
                return _json(200, {"standardEnvVars": [], "harnesses": {}})

            with self._lock:
                for rule in self._failures:
                    if rule.matches(method, raw_path):
                        rule.remaining -= 1
                        raise HubError(rule.status, f"Injected failure ({rule.status}) by LocalHubServer")
                self._failures = [r for r in self._failures if r.remaining > 0]

            self._check_auth(req)
            body = req.body
            with self._lock:
                return self._route(method, raw_path, segs, query, body, req)
        except HubError as e:
            headers = dict(e.headers)
            if e.error_code is not None:
                headers["X-Error-Code"] = e.error_code
            headers["X-Error-Message"] = e.message
            return _json(e.status, {"error": e.message, **e.extra}, headers)
        except Exception as e:  # pragma: no cover - bug in the test server itself
            import traceback

            traceback.print_exc(file=sys.stderr)
            return _json(500, {"error": f"LocalHubServer internal error: {e!r}"})

    def _check_auth(self, req: _HubRequestHandler) -> None:
        accepted = self.require_token
        if accepted is None:
            return
        accepted_set = {accepted} if isinstance(accepted, str) else set(accepted)
        auth = req.headers.get("Authorization", "")
        token = auth[len("Bearer ") :].strip() if auth.lower().startswith("bearer ") else None
        if token not in accepted_set:
            raise HubError(401, _INVALID_CREDENTIALS)

    def _route(self, method, raw_path, segs, query, body, req) -> tuple[int, dict[str, str], bytes]:
        if segs[:1] == ["api"]:
            if segs == ["api", "whoami-v2"] and method == "GET":
                return self._whoami()
            if segs == ["api", "repos", "create"] and method == "POST":
                return self._create_repo(_load_json(body))
            if segs == ["api", "repos", "delete"] and method == "DELETE":
                return self._delete_repo(_load_json(body))
            if segs == ["api", "validate-yaml"] and method == "POST":
                return _json(200, {"errors": [], "warnings": []})
            if len(segs) >= 3 and segs[1] in _REPO_TYPES:
                return self._repo_api(method, _REPO_TYPES[segs[1]], segs[2:], query, body, req)
        elif "resolve" in segs and method in ("GET", "HEAD"):
            return self._resolve_file(method, segs, req)
        raise HubError(404, f"LocalHubServer: route not implemented: {method} {raw_path}")

    # -- /api/whoami-v2, /api/repos/*

    def _whoami(self):
        return _json(
            200,
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.username,
                "fullname": "Test User",
                "email": f"{self.username}@example.com",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            },
        )

    def _full_repo_id(self, payload: dict) -> tuple[str, str]:
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        name = payload.get("name")
        if not name:
            raise HubError(400, "Missing repo name")
        organization = payload.get("organization") or self.username
        return repo_type, f"{organization}/{name}"

    def _create_repo(self, payload: dict):
        repo_type, repo_id = self._full_repo_id(payload)
        repo_url = f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self._repos:
            # The client reads `url` from the 409 body when `exist_ok=True`.
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": repo_url})
        private = payload.get("private", False) or payload.get("visibility") == "private"
        self._new_repo(repo_type, repo_id, bool(private))
        return _json(
            200, {"url": repo_url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]}
        )

    def _delete_repo(self, payload: dict):
        repo_type, repo_id = self._full_repo_id(payload)
        self._get_repo(repo_type, repo_id)
        del self._repos[(repo_type, repo_id)]
        return _json(200, {})

    # -- /api/{type}s/{repo_id}/...

    def _split_repo_id(self, repo_type: str, rest: list[str]) -> tuple[str, list[str]]:
        rest = [unquote(s) for s in rest]
        if len(rest) >= 2:
            two = f"{rest[0]}/{rest[1]}"
            if (repo_type, two) in self._repos:
                return two, rest[2:]
            if (repo_type, rest[0]) in self._repos:
                return rest[0], rest[1:]
            if rest[1] not in _REPO_ACTIONS:
                return two, rest[2:]
        return rest[0], rest[1:]

    def _repo_api(self, method, repo_type, rest, query, body, req):
        # Revisions are sent quoted with safe="" ("refs%2Fpr%2F1"): split on raw "/", then unquote each part.
        repo_id, tail = self._split_repo_id(repo_type, rest)
        repo = self._get_repo(repo_type, repo_id)
        action = tail[0] if tail else None

        if action is None and method == "GET":
            return self._repo_info(repo, "main", query)
        if action == "revision" and method == "GET" and len(tail) >= 2:
            return self._repo_info(repo, "/".join(tail[1:]), query)
        if action == "tree" and method == "GET" and len(tail) >= 2:
            return self._tree(repo, tail[1], "/".join(tail[2:]), query)
        if action == "paths-info" and method == "POST" and len(tail) >= 2:
            return self._paths_info(repo, "/".join(tail[1:]), body, req)
        if action == "commits" and method == "GET" and len(tail) >= 2:
            return self._list_commits(repo, "/".join(tail[1:]))
        if action == "refs" and method == "GET":
            return self._refs(repo, query)
        if action == "branch" and len(tail) >= 2:
            return self._branch(repo, method, "/".join(tail[1:]), _load_json(body) if body else {})
        if action == "preupload" and method == "POST" and len(tail) >= 2:
            return self._preupload(repo, "/".join(tail[1:]), _load_json(body), query)
        if action == "commit" and method == "POST" and len(tail) >= 2:
            return self._create_commit(repo, "/".join(tail[1:]), body, query)
        raise HubError(404, f"LocalHubServer: repo route not implemented: {method} {'/'.join(tail)}")

    def _repo_info(self, repo: _Repo, revision: str, query):
        oid = self._resolve(repo, revision)
        commit = repo.commits[oid]
        blobs = _truthy(query.get("blobs"))
        siblings = []
        for path in sorted(commit.files):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=len(commit.files[path]), blobId=git_blob_sha1(commit.files[path]))
            siblings.append(sib)
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return _json(200, info)

    def _tree(self, repo: _Repo, revision: str, path: str, query):
        oid = self._resolve(repo, revision)
        files = repo.commits[oid].files
        recursive = _truthy(query.get("recursive"))
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries: dict[str, dict] = {}
        for fpath in sorted(files):
            if not fpath.startswith(prefix):
                continue
            rel_parts = fpath[len(prefix) :].split("/")
            # folders along the way
            for depth in range(1, len(rel_parts)):
                folder = prefix + "/".join(rel_parts[:depth])
                if folder not in entries:
                    entries[folder] = {
                        "type": "directory",
                        "oid": git_blob_sha1(folder.encode()),
                        "size": 0,
                        "path": folder,
                    }
                if not recursive:
                    break
            if recursive or len(rel_parts) == 1:
                content = files[fpath]
                entries[fpath] = {
                    "type": "file",
                    "oid": git_blob_sha1(content),
                    "size": len(content),
                    "path": fpath,
                }
        if prefix and not entries:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": oid})
        return _json(200, list(entries.values()), {"X-Repo-Commit": oid})

    def _paths_info(self, repo: _Repo, revision: str, body: bytes, req):
        oid = self._resolve(repo, revision)
        files = repo.commits[oid].files
        ctype = req.headers.get("Content-Type", "")
        if "json" in ctype:
            payload = _load_json(body)
            paths = payload.get("paths", [])
        else:
            paths = parse_qs(body.decode(), keep_blank_values=True).get("paths", [])
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                content = files[p]
                out.append({"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": p})
            elif any(f.startswith(p + "/") for f in files):
                out.append({"type": "directory", "oid": git_blob_sha1(p.encode()), "size": 0, "path": p})
        return _json(200, out)

    def _list_commits(self, repo: _Repo, revision: str):
        oid = self._resolve(repo, revision)
        return _json(
            200,
            [
                {
                    "id": c.oid,
                    "title": c.message,
                    "message": c.description,
                    "authors": [{"user": self.username, "avatar": None}],
                    "date": _iso(c.date),
                }
                for c in self._history(repo, oid)
            ],
        )

    def _refs(self, repo: _Repo, query):
        def ref(name, full):
            return {"name": name, "ref": full, "targetCommit": repo.branches[name]}

        branches = [ref(b, f"refs/heads/{b}") for b in repo.branches if not b.startswith("refs/pr/")]
        prs = [ref(b, b) for b in repo.branches if b.startswith("refs/pr/")]
        data = {"branches": branches, "converts": [], "tags": []}
        if _truthy(query.get("include_prs")):
            data["pullRequests"] = prs
        return _json(200, data)

    def _branch(self, repo: _Repo, method: str, branch: str, payload: dict):
        if method == "POST":
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = payload.get("startingPoint") or "main"
            repo.branches[branch] = self._resolve(repo, start)
            return _json(200, {})
        if method == "DELETE":
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del repo.branches[branch]
            return _json(200, {})
        raise HubError(405, f"Method {method} not allowed on branch route")

    def _preupload(self, repo: _Repo, revision: str, payload: dict, query):
        files_at_rev: dict[str, bytes] = {}
        if revision in repo.branches or revision in repo.commits:
            files_at_rev = repo.commits[self._resolve(repo, revision)].files
        elif not _truthy(query.get("create_pr")):
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        out = []
        for f in payload.get("files", []):
            path = f["path"]
            existing = files_at_rev.get(path)
            out.append(
                {
                    "path": path,
                    "uploadMode": "regular",  # never "lfs": content goes inline (base64) in the commit NDJSON
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing) if existing is not None else None,
                }
            )
        return _json(200, {"files": out, "commitOid": repo.branches.get(revision)})

    def _create_commit(self, repo: _Repo, revision: str, body: bytes, query):
        if revision not in repo.branches:
            if revision in repo.commits:
                raise HubError(400, f"Cannot commit to a commit oid ({revision}): use a branch")
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

        lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a 'header' line")
        header = lines[0]["value"]
        summary = header.get("summary") or ""
        if not summary:
            raise HubError(400, "Commit summary is required")
        parent_commit = header.get("parentCommit")
        if parent_commit is not None and not repo.branches[revision].startswith(parent_commit):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")

        files = dict(repo.commits[repo.branches[revision]].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = str(value.get("path", "")).strip("/")
            if key == "file":
                content = value.get("content", "")
                if value.get("encoding", "utf-8") == "base64":
                    files[path] = base64.b64decode(content)
                else:
                    files[path] = content.encode("utf-8")
            elif key == "lfsFile":
                oid = value.get("oid")
                if oid not in self._lfs_store:
                    raise HubError(
                        400, f"LocalHubServer does not support LFS uploads (unknown oid {oid} for {path})"
                    )
                files[path] = self._lfs_store[oid]
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                to_delete = [f for f in files if f.startswith(path + "/")] if path else list(files)
                if not to_delete:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for f in to_delete:
                    del files[f]
            else:
                raise HubError(400, f"Unknown commit operation key: {key!r}")

        pr_url = None
        branch = revision
        if _truthy(query.get("create_pr")):
            num = repo.next_pr
            repo.next_pr += 1
            branch = f"refs/pr/{num}"
            repo.branches[branch] = repo.branches[revision]
            pr_url = f"{self.url}/{repo.url_path}/discussions/{num}"
        commit = self._commit(repo, branch, files, summary, header.get("description") or "")
        return _json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.url}/{repo.url_path}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            },
        )

    # -- /[{type}s/]{repo_id}/resolve/{rev}/{path}

    def _resolve_file(self, method: str, segs: list[str], req):
        idx = segs.index("resolve")
        repo_segs = segs[:idx]
        repo_type = "model"
        if repo_segs and repo_segs[0] in _REPO_TYPES and len(repo_segs) > 1 and repo_segs[0] != "models":
            repo_type = _REPO_TYPES[repo_segs[0]]
            repo_segs = repo_segs[1:]
        if len(segs) < idx + 3 or not repo_segs:
            raise HubError(404, "Entry not found", "EntryNotFound")
        repo = self._get_repo(repo_type, "/".join(unquote(s) for s in repo_segs))
        oid = self._resolve(repo, unquote(segs[idx + 1]))
        path = unquote("/".join(segs[idx + 2 :]))
        files = repo.commits[oid].files
        if path not in files:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        content = files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(content)}"',
            "X-Repo-Commit": oid,
            "Accept-Ranges": "bytes",
        }
        status = 200
        rng = req.headers.get("Range")
        if rng and method == "GET":
            start, end = _parse_range(rng, len(content))
            if start is None:
                headers["Content-Range"] = f"bytes */{len(content)}"
                return 416, headers, b""
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content = content[start : end + 1]
            status = 206
        return status, headers, content


class _HubRequestHandler(BaseHTTPRequestHandler):
    hub: LocalHubServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"
    server_version = "LocalHubServer/1.0"
    timeout = 30  # seconds of idleness before a handler thread gives up on its socket

    def log_message(self, format, *args):  # silence stderr logging
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self):
        # Always consume the body first so the connection stays in a consistent state.
        self.body = self._read_body()
        status, headers, body = self.hub._handle(self)
        self.hub.requests.append((self.command, urlsplit(self.path).path, status))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        # One request per connection: no stale keep-alive sockets in the client's shared pool across servers.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _serve


def _json(status: int, payload: Any, headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    h = {"Content-Type": "application/json; charset=utf-8"}
    h.update(headers or {})
    return status, h, json.dumps(payload).encode()


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8")) if body else {}
    except ValueError as e:
        raise HubError(400, f"Invalid JSON body: {e}") from e


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes", "on")


def _parse_range(header: str, size: int) -> tuple[int | None, int | None]:
    try:
        unit, spec = header.split("=", 1)
        if unit.strip().lower() != "bytes" or "," in spec:
            return None, None
        start_s, end_s = (s.strip() for s in spec.split("-", 1))
        if not start_s:  # suffix range: last N bytes
            n = int(end_s)
            start, end = max(size - n, 0), size - 1
        else:
            start = int(start_s)
            end = min(int(end_s), size - 1) if end_s else size - 1
        if start >= size or start > end:
            return None, None
        return start, end
    except ValueError:
        return None, None


# ---------------------------------------------------------------------- client patching + fixture


def patch_hf_client(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, home: str | os.PathLike, token: str = TEST_TOKEN
):
    """Point the (already imported) ``huggingface_hub`` client at ``endpoint``, online, with a private cache.

    ``huggingface_hub.constants`` computes ENDPOINT, HUGGINGFACE_CO_URL_TEMPLATE, HF_HUB_OFFLINE, cache
    paths, HF_HUB_DISABLE_XET, ... once at import time, and a module-level ``HfApi`` instance (behind
    ``huggingface_hub.create_repo``, ``upload_folder``, ...) captured the endpoint when it was created:
    setting env vars alone is not enough, the module attributes are patched too. ``monkeypatch`` undoes
    everything.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    endpoint = endpoint.rstrip("/")
    home = os.fspath(home)
    hub_cache = os.path.join(home, "hub")
    assets_cache = os.path.join(home, "assets")
    xet_cache = os.path.join(home, "xet")
    token_path = os.path.join(home, "token")

    # Environment (read lazily by some code paths, e.g. the token, and by subprocesses).
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": token,
        "HF_HOME": home,
        "HF_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HF_XET_CACHE": xet_cache,
        "HF_TOKEN_PATH": token_path,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_CO_STAGING", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)

    # Import-time constants.
    consts = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HOME": home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HUGGINGFACE_ASSETS_CACHE": assets_cache,
        "HF_XET_CACHE": xet_cache,
        "HF_TOKEN_PATH": token_path,
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(home, ".check_for_update_done"),
    }
    for name, value in consts.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    host = urlsplit(endpoint).hostname
    if host and hasattr(constants, "HF_URL_HOSTS"):
        monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {host.lower()}))
    if hasattr(huggingface_hub, "HUGGINGFACE_CO_URL_TEMPLATE"):
        monkeypatch.setattr(
            huggingface_hub, "HUGGINGFACE_CO_URL_TEMPLATE", consts["HUGGINGFACE_CO_URL_TEMPLATE"]
        )

    # Origins whose redirects keep the auth header.
    if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):
        monkeypatch.setattr(
            _http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)})
        )

    # Names imported by value (`from ..constants import X`) in already-imported modules.
    for mod_name, attr, value in [
        ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", hub_cache),
        ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", assets_cache),
        ("huggingface_hub.utils._git_credential", "ENDPOINT", endpoint),
        ("huggingface_hub.cli.auth", "ENDPOINT", endpoint),
    ]:
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, attr):
            monkeypatch.setattr(mod, attr, value)

    # The module-level HfApi behind `huggingface_hub.create_repo`, `upload_folder`, `whoami`, ...
    hf_api_mod = sys.modules.get("huggingface_hub.hf_api")
    if hf_api_mod is not None and hasattr(hf_api_mod, "api"):
        monkeypatch.setattr(hf_api_mod.api, "endpoint", endpoint)

    # Agent detection fetches `{ENDPOINT}/api/agent-harnesses` once per process and caches it under HF_HOME.
    detect = sys.modules.get("huggingface_hub.utils._detect_agent")
    if detect is not None and hasattr(detect, "_registry"):
        monkeypatch.setattr(
            detect, "_registry", getattr(detect, "_EMPTY_REGISTRY", {"standardEnvVars": [], "harnesses": {}})
        )

    # transformers caches a shared HfApi (created lazily with the endpoint of that moment).
    _reset_transformers_hf_api(monkeypatch)

    # Drop pooled connections of the shared httpx client.
    _http.close_session()


def _reset_transformers_hf_api(monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    mod = sys.modules.get("transformers.utils.hub")
    if mod is None or not hasattr(mod, "_hf_api"):
        return
    if monkeypatch is not None:
        monkeypatch.setattr(mod, "_hf_api", None)
    else:
        mod._hf_api = None


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterable[LocalHubServer]:
    """A running :class:`LocalHubServer`; ``huggingface_hub`` (and ``transformers``) point at it for the test.

    Env: HF_ENDPOINT=<server url>, HF_HUB_OFFLINE=0, HF_HUB_DISABLE_XET=1, HF_TOKEN=TEST_TOKEN,
    HF_HOME/HF_HUB_CACHE under ``tmp_path``. ``require_token`` is off by default; set
    ``hub_server.require_token = TEST_TOKEN`` to enforce authentication.
    """
    from huggingface_hub.utils import _http

    server = LocalHubServer().start()
    try:
        patch_hf_client(monkeypatch, server.url, tmp_path / "hf_home", token=TEST_TOKEN)
        yield server
    finally:
        server.stop()
        _http.close_session()
        # transformers may have created (and cached) its HfApi during the test: don't leak it to the next one.
        _reset_transformers_hf_api()
