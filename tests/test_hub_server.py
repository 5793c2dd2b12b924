"""The local Hub endpoint of the tests (``tests/hub_server.py``) against the installed ``huggingface_hub``."""

from __future__ import annotations

import json

import pytest

# One client process: create a repo, upload a folder twice (the second commit changes one file and keeps the
# others), then read it back every way mome does; prints what the test checks as one JSON line.
CLIENT = r"""
import json, sys
from pathlib import Path
import huggingface_hub as hf
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

folder = Path(sys.argv[1])
api = hf.HfApi()
url = api.create_repo("org/files", exist_ok=False)
again = api.create_repo("org/files", exist_ok=True)
first = api.upload_folder(repo_id="org/files", folder_path=folder, commit_message="first")
(folder / "weights.bin").write_bytes(b"new weights")
second = api.upload_folder(repo_id="org/files", folder_path=folder, commit_message="second")
info = api.model_info("org/files")
snapshot = Path(hf.snapshot_download("org/files"))
old = Path(hf.hf_hub_download("org/files", "weights.bin", revision=first.oid))
errors = {}
for name, call in {
    "missing_file": lambda: hf.hf_hub_download("org/files", "nope.txt"),
    "missing_repo": lambda: hf.hf_hub_download("org/nope", "config.json"),
    "missing_repo_snapshot": lambda: hf.snapshot_download("org/nope"),
    "missing_revision": lambda: hf.hf_hub_download("org/files", "config.json", revision="nope"),
}.items():
    try:
        call()
        errors[name] = None
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
        errors[name] = type(err).__name__
print(json.dumps({
    "url": str(url), "again": str(again), "first": first.oid, "second": second.oid, "commit_url": second.commit_url,
    "sha": info.sha, "siblings": sorted(s.rfilename for s in info.siblings),
    "snapshot": {str(p.relative_to(snapshot)): p.read_text() for p in sorted(snapshot.rglob("*")) if p.is_file()},
    "old": old.read_text(), "errors": errors,
}))
"""


def test_huggingface_hub_uploads_to_and_downloads_from_the_local_hub(local_hub, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "weights.bin").write_text("old weights")
    (folder / "sub" / "notes.txt").write_text("nested")
    (folder / "README.md").write_text("---\nlibrary_name: mome\n---\n\n# files\n")

    result = local_hub.run_python(CLIENT, tmp_path / "hf_home", str(folder))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])

    assert out["url"] == out["again"] == f"{local_hub.url}/org/files"
    assert out["first"] != out["second"] == out["sha"]
    assert out["commit_url"] == f"{local_hub.url}/org/files/commit/{out['second']}"
    expected = {"README.md", "config.json", "sub/notes.txt", "weights.bin"}
    assert out["siblings"] == sorted(expected)
    assert out["snapshot"] == {**{p: (folder / p).read_text() for p in expected}, "weights.bin": "new weights"}
    assert out["old"] == "old weights"  # a file at an earlier commit
    assert out["errors"] == {
        "missing_file": "RemoteEntryNotFoundError",
        "missing_repo": "RepositoryNotFoundError",
        "missing_repo_snapshot": "RepositoryNotFoundError",
        "missing_revision": "RevisionNotFoundError",
    }
    # the second upload sent only the changed file: the unchanged ones were known to the Hub (preupload oids)
    assert local_hub.repo_files("org/files")["weights.bin"] == b"new weights"
    assert local_hub.commits == [("org/files", "first", sorted(expected)), ("org/files", "second", ["weights.bin"])]
    assert not [r for r in local_hub.requests if r[2] >= 500], local_hub.requests


def test_the_local_hub_refuses_writes_without_the_token_and_bad_cards(local_hub, tmp_path):
    code = r"""
import sys
import huggingface_hub as hf
from huggingface_hub.errors import HfHubHTTPError
try:
    hf.HfApi(token="wrong").create_repo("org/x")
except HfHubHTTPError as err:
    print("create:", err.response.status_code)
api = hf.HfApi()
api.create_repo("org/card", private=True)
try:
    api.upload_file(path_or_fileobj=b"---\n[not: a mapping\n---\n", path_in_repo="README.md", repo_id="org/card")
except ValueError as err:
    print("card:", type(err).__name__, str(err).splitlines()[0])
"""
    result = local_hub.run_python(code, tmp_path / "hf_home")
    assert result.returncode == 0, result.stderr
    assert "create: 401" in result.stdout and "card: ValueError Invalid metadata in README.md." in result.stdout
    assert local_hub.is_private("org/card") and local_hub.repo_files("org/card") == {}
    with pytest.raises(Exception, match="Repository not found: org/x"):
        local_hub.repo_files("org/x")
