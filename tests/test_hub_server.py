"""Exercise tests/hub_server.py through the real huggingface_hub client (no project code involved)."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

try:  # tests/conftest.py puts tests/ on sys.path and imports the fixture from `hub_server`
    from hub_server import TEST_TOKEN, TEST_USER, LocalHubServer, hub_server  # noqa: F401
except ImportError:  # pragma: no cover - running without that conftest
    from tests.hub_server import TEST_TOKEN, TEST_USER, LocalHubServer, hub_server  # noqa: F401


REPO = f"{TEST_USER}/softprompt-test"
BINARY = bytes(range(256)) * 4 + b"\x00\xff\x00"


def _make_folder(root: Path) -> Path:
    folder = root / "to_upload"
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / "config.json").write_text('{"num_virtual_tokens": 8}\n')
    (folder / "nested" / "deeper" / "notes.txt").write_text("nested file\n")
    (folder / "weights.bin").write_bytes(BINARY)
    return folder


EXPECTED = {"config.json", "nested/deeper/notes.txt", "weights.bin"}


@pytest.fixture
def uploaded(hub_server, tmp_path):
    api = HfApi()
    api.create_repo(REPO)
    folder = _make_folder(tmp_path)
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="first upload", create_pr=False)
    return api, folder, info


def test_client_points_at_local_server(hub_server):
    from huggingface_hub import constants

    assert constants.ENDPOINT == hub_server.url
    assert HfApi().endpoint == hub_server.url
    assert not constants.HF_HUB_OFFLINE
    assert os.environ["HF_ENDPOINT"] == hub_server.url


def test_create_repo_exist_ok(hub_server):
    api = HfApi()
    url = api.create_repo(REPO)
    assert url.repo_id == REPO
    assert url.startswith(hub_server.url)
    assert hub_server.repo_exists(REPO)

    # Like the Hub: a second create answers 409, which the client swallows with exist_ok=True...
    again = api.create_repo(REPO, exist_ok=True)
    assert again.repo_id == REPO
    assert ("POST", "/api/repos/create", 409) in hub_server.requests
    # ...and raises without it.
    with pytest.raises(HfHubHTTPError) as exc_info:
        api.create_repo(REPO)
    assert exc_info.value.response.status_code == 409

    # No namespace => the server's user namespace (as the Hub does with the token's user).
    assert api.create_repo("bare-name").repo_id == f"{TEST_USER}/bare-name"
    assert api.whoami()["name"] == TEST_USER


def test_upload_folder_list_download_snapshot(hub_server, uploaded, tmp_path):
    api, folder, info = uploaded
    assert info.oid == hub_server.head(REPO)
    assert hub_server.commits(REPO)[-1]["message"] == "first upload"
    assert set(hub_server.files(REPO)) == EXPECTED
    assert hub_server.files(REPO)["weights.bin"] == BINARY

    # Plain (non-LFS, non-Xet) path was taken: preupload then an inline NDJSON commit.
    methods_paths = [(m, p) for m, p, _ in hub_server.requests]
    assert ("POST", f"/api/models/{REPO}/preupload/main") in methods_paths
    assert ("POST", f"/api/models/{REPO}/commit/main") in methods_paths

    assert sorted(api.list_repo_files(REPO)) == sorted(EXPECTED)
    assert api.model_info(REPO).sha == info.oid

    path = hf_hub_download(REPO, "weights.bin")
    assert Path(path).read_bytes() == BINARY
    nested = hf_hub_download(REPO, "nested/deeper/notes.txt")
    assert Path(nested).read_text() == "nested file\n"
    assert info.oid in path  # cached under snapshots/<commit sha>/

    snap = Path(snapshot_download(REPO, local_dir=tmp_path / "snap"))
    got = {p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert got == EXPECTED
    for rel in EXPECTED:
        assert filecmp.cmp(folder / rel, snap / rel, shallow=False), rel

    cached = Path(snapshot_download(REPO))  # into HF_HUB_CACHE (tmp dir)
    assert (cached / "weights.bin").read_bytes() == BINARY


def test_second_commit_and_old_revision(hub_server, uploaded, tmp_path):
    api, folder, first = uploaded
    (folder / "config.json").write_text('{"num_virtual_tokens": 16}\n')
    second = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="second upload")
    assert second.oid != first.oid

    # Unchanged files are detected as no-ops by the client thanks to the preupload `oid` answer.
    assert [c["message"] for c in hub_server.commits(REPO)] == [
        "initial commit",
        "first upload",
        "second upload",
    ]

    new = hf_hub_download(REPO, "config.json")
    assert Path(new).read_text() == '{"num_virtual_tokens": 16}\n'
    old = hf_hub_download(REPO, "config.json", revision=first.oid)
    assert Path(old).read_text() == '{"num_virtual_tokens": 8}\n'
    assert hub_server.files(REPO, revision=first.oid)["config.json"] == b'{"num_virtual_tokens": 8}\n'
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:2] == [second.oid, first.oid]

    # Deletions (file + folder) through create_commit.
    api.create_commit(
        REPO,
        operations=[CommitOperationDelete("weights.bin"), CommitOperationDelete("nested/", is_folder=True)],
        commit_message="cleanup",
    )
    assert set(api.list_repo_files(REPO)) == {"config.json"}
    assert set(api.list_repo_files(REPO, revision=first.oid)) == EXPECTED


def test_single_500_on_commit_then_manual_retry(hub_server, tmp_path):
    api = HfApi()
    api.create_repo(REPO)
    folder = _make_folder(tmp_path)
    hub_server.fail_next(1, 500, method="POST", path_contains="/commit/")

    # The commit POST is not retried by create_commit/upload_folder (HF_HUB_DISABLE_XET=1 path): it raises.
    with pytest.raises(HfHubHTTPError) as exc_info:
        api.upload_folder(repo_id=REPO, folder_path=folder)
    assert exc_info.value.response.status_code == 500
    assert hub_server.files(REPO) == {}
    assert ("POST", f"/api/models/{REPO}/commit/main", 500) in hub_server.requests

    api.upload_folder(repo_id=REPO, folder_path=folder)  # manual retry
    assert set(hub_server.files(REPO)) == EXPECTED


def test_client_retries_idempotent_calls_by_itself(hub_server):
    """Unlike the commit POST, preupload (http_backoff, ~1 s sleep) and the download HEAD are retried."""
    api = HfApi()
    api.create_repo(REPO)
    hub_server.fail_next(1, 503, path_contains="/preupload/")
    api.upload_file(path_or_fileobj=b"r", path_in_repo="r.txt", repo_id=REPO)
    assert [s for m, p, s in hub_server.requests if "/preupload/" in p] == [503, 200]

    hub_server.fail_next(1, 500, method="HEAD")
    assert Path(hf_hub_download(REPO, "r.txt")).read_bytes() == b"r"
    assert [s for m, p, s in hub_server.requests if m == "HEAD"] == [500, 200]


def test_dataset_repo_branches_paths_info_and_copy(hub_server):
    api = HfApi()
    ds = "org/ds"
    api.create_repo(ds, repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data/train.csv", repo_id=ds, repo_type="dataset"
    )
    assert api.list_repo_files(ds, repo_type="dataset") == ["data/train.csv"]
    top = list(api.list_repo_tree(ds, repo_type="dataset"))
    assert [(type(e).__name__, e.path) for e in top] == [("RepoFolder", "data")]
    infos = api.get_paths_info(ds, ["data", "data/train.csv", "nope"], repo_type="dataset")
    assert [e.path for e in infos] == ["data", "data/train.csv"]

    api.create_branch(ds, branch="dev", repo_type="dataset")
    api.create_branch(ds, branch="dev", repo_type="dataset", exist_ok=True)
    api.upload_file(
        path_or_fileobj=b"dev", path_in_repo="x.txt", repo_id=ds, repo_type="dataset", revision="dev"
    )
    assert {b.name for b in api.list_repo_refs(ds, repo_type="dataset").branches} == {"main", "dev"}
    assert "x.txt" not in hub_server.files(ds, repo_type="dataset")
    assert hub_server.files(ds, revision="dev", repo_type="dataset")["x.txt"] == b"dev"

    api.create_commit(
        ds,
        [CommitOperationCopy("data/train.csv", "copy.csv")],
        commit_message="copy",
        repo_type="dataset",
    )
    assert hub_server.files(ds, repo_type="dataset")["copy.csv"] == b"a,b\n1,2\n"
    path = hf_hub_download(ds, "copy.csv", repo_type="dataset")
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    api.delete_repo(ds, repo_type="dataset")
    assert not hub_server.repo_exists(ds, repo_type="dataset")


def test_create_pr_leaves_main_untouched(hub_server):
    api = HfApi()
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=REPO)
    info = api.upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id=REPO, create_pr=True)
    assert info.pr_revision == "refs/pr/1"
    assert hub_server.files(REPO)["a.txt"] == b"v1"
    assert hub_server.files(REPO, revision="refs/pr/1")["a.txt"] == b"v2"
    assert Path(hf_hub_download(REPO, "a.txt", revision="refs/pr/1")).read_bytes() == b"v2"


def test_wrong_token_gets_401(hub_server):
    api = HfApi()
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    hub_server.require_token = TEST_TOKEN

    with pytest.raises(HfHubHTTPError) as exc_info:
        HfApi(token="hf_wrong").model_info(REPO)
    assert exc_info.value.response.status_code == 401
    assert not isinstance(exc_info.value, RepositoryNotFoundError)
    assert "Invalid credentials" in str(exc_info.value)

    with pytest.raises(HfHubHTTPError) as exc_info:
        hf_hub_download(REPO, "x.txt", token="hf_wrong")
    assert exc_info.value.response.status_code == 401

    # The env token (HF_TOKEN set by the fixture) is accepted.
    assert HfApi().model_info(REPO).id == REPO
    assert Path(hf_hub_download(REPO, "x.txt")).read_bytes() == b"x"


def test_not_found_errors(hub_server):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{TEST_USER}/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{TEST_USER}/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=f"{TEST_USER}/does-not-exist")

    api.create_repo(REPO)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    assert api.file_exists(REPO, "missing.json") is False
    assert api.repo_exists(f"{TEST_USER}/does-not-exist") is False


def test_transformers_push_to_hub_mixin(hub_server, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.PretrainedConfig(foo=1)
    commit = config.push_to_hub(f"{TEST_USER}/tf-config", commit_message="Upload config")
    files = hub_server.files(f"{TEST_USER}/tf-config")
    assert {"config.json", "README.md"} <= set(files)
    assert commit.oid == hub_server.head(f"{TEST_USER}/tf-config")
    reloaded = transformers.PretrainedConfig.from_pretrained(f"{TEST_USER}/tf-config")
    assert reloaded.foo == 1


def test_server_standalone_context_manager():
    with LocalHubServer() as server:
        assert server.url.startswith("http://127.0.0.1:")
        server.add_commit("org/seeded", {"a.txt": "hello"}, message="seed")
        assert server.files("org/seeded") == {"a.txt": b"hello"}
        assert [c["message"] for c in server.commits("org/seeded")] == ["initial commit", "seed"]
