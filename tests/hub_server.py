"""A local Hugging Face Hub endpoint for tests: the part of the Hub API that ``huggingface_hub`` uses to create a
model repo, upload a folder to it and download files and snapshots from it.

The machine running the tests has no network, so the upload and download paths of mome (``mome.push_to_hub``,
``create_model("hf-hub:...")``, ``mome-train export.push_to_hub=...``) are tested against this server instead:
a threaded ``http.server`` bound to 127.0.0.1 on an ephemeral port, answering loopback requests only, with the
blobs of every commit in a folder (``root``) and the repos' branches and commits in memory.

Served, as the installed ``huggingface_hub`` (2.x) calls them:

- ``POST /api/repos/create`` (``HfApi.create_repo``; 409 when the repo exists, which ``exist_ok`` accepts);
- ``POST /api/validate-yaml`` (``upload_folder`` checks a ``README.md``'s front-matter first);
- ``POST /api/models/{repo}/preupload/{rev}``: every file is a "regular" upload (its content goes base64 in the
  commit, so no LFS or Xet storage is needed), with the git oid of the file already there so that an unchanged
  file is skipped as on the Hub;
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON body of a ``header`` line and ``file`` / ``deletedFile`` /
  ``deletedFolder`` lines, committed atomically on the branch (``parentCommit`` checked);
- ``GET /api/models/{repo}[/revision/{rev}]`` (``model_info``/``repo_info``: ``sha``, ``siblings``, ``private``)
  and ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``list_repo_tree``, which ``snapshot_download`` reads);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (``hf_hub_download``) with ``X-Repo-Commit``, ``ETag`` (the
  file's git blob oid, as the Hub sends for files not in LFS), ``Content-Length`` and ``Range`` requests.

Errors are JSON with the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``), so
the client raises its typed errors. Writes need ``Authorization: Bearer <token>``; a private repo is not found
without it. Only model repos with an ``org/name`` id are served.

``huggingface_hub`` reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` when it is imported, and the test suite runs
with ``HF_HUB_OFFLINE=1``: clients run in a subprocess with :meth:`LocalHub.client_env` (or
:meth:`LocalHub.run_python`). The ``local_hub`` fixture of ``tests/conftest.py`` starts a server per test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["DEFAULT_TOKEN", "HubError", "LocalHub"]

DEFAULT_TOKEN = "dummy-token"
_MAX_BODY = 1 << 30  # a request body above 1 GiB is refused (413)
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"
# (method, pattern, handler name); a path is matched unquoted segment by segment, see ``_Handler._route``
_ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/{_REV}"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/{_REV}"), "commit"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/{_REV})?"), "repo_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?"), "tree"),
    ("GET", re.compile(rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)"), "resolve"),
]


class HubError(Exception):
    """An error answer: HTTP status, the Hub's ``X-Error-Code`` (or None) and a message; ``headers`` are added to the
    answer's and ``fields`` to its JSON body."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        headers: dict[str, str] | None = None,
        fields: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.fields = headers or {}, fields or {}


def git_blob_oid(data: bytes) -> str:
    """The git oid of a blob (``git hash-object``): what the Hub reports for files stored in git, not LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    """One model repo: its branches (name -> commit oid) and commits (oid -> {path: blob oid})."""

    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, str]] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def resolve(self, repo_id: str, revision: str) -> str:
        """The commit oid of a branch name or a full commit oid."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision} (repo {repo_id})")


class LocalHub:
    """The server: start it with ``with LocalHub(root) as hub`` (or :meth:`start`/:meth:`close`); ``hub.url`` is
    the ``HF_ENDPOINT`` to give clients. ``hub.requests`` records ``(method, path, status)`` of every request and
    ``hub.commits`` ``(repo_id, summary, paths)`` of every commit (``paths``: the files it added or deleted)."""

    def __init__(self, root: str | Path, token: str = DEFAULT_TOKEN) -> None:
        self.root = Path(root)
        self.token = token
        self.requests: list[tuple[str, str, int]] = []
        self.commits: list[tuple[str, str, list[str]]] = []
        self._blobs = self.root / "blobs"
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle --------------------------------------------------------------------------------------------

    def start(self) -> LocalHub:
        self._blobs.mkdir(parents=True, exist_ok=True)
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the local hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- what tests read ---------------------------------------------------------------------------------------

    def client_env(self, hf_home: str | Path, **extra: str) -> dict[str, str]:
        """The environment of a client process: this endpoint, online, its own ``HF_HOME`` cache, the token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(
            HF_ENDPOINT=self.url,
            HF_HUB_OFFLINE="0",
            HF_HOME=str(hf_home),
            HF_TOKEN=self.token,
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_ETAG_TIMEOUT="30",
            HF_HUB_DOWNLOAD_TIMEOUT="30",
        )
        env.update(extra)
        return env

    def run_python(
        self, code: str, hf_home: str | Path, *args: str, timeout: float = 300, cwd: str | Path | None = None
    ) -> subprocess.CompletedProcess:
        """Run ``python -c code args...`` as a client of this hub (see :meth:`client_env`); output captured."""
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            env=self.client_env(hf_home),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (path -> content)."""
        with self._lock:
            repo = self._repo(repo_id, authorized=True)
            files = dict(repo.commits[repo.resolve(repo_id, revision)])
        return {path: (self._blobs / oid).read_bytes() for path, oid in files.items()}

    def is_private(self, repo_id: str) -> bool:
        with self._lock:
            return self._repo(repo_id, authorized=True).private

    # --- the API, called by the handler; each method takes the lock itself ------------------------------------

    def _repo(self, repo_id: str, authorized: bool) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        return repo

    def _store(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        path = self._blobs / oid
        if not path.exists():
            tmp = path.with_name(f"{oid}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return oid

    def create_repo(self, payload: dict) -> tuple[int, dict]:
        name, organization = payload.get("name"), payload.get("organization") or "user"
        if payload.get("type", "model") != "model":
            raise HubError(400, None, f"the local hub serves model repos only, not {payload.get('type')!r}")
        repo_id = f"{organization}/{name}"
        if not name or "/" in name or "/" in organization:
            raise HubError(400, None, f"invalid repo name {repo_id!r}")
        with self._lock:
            if repo_id in self._repos:
                # the Hub's 409 names the repo's URL, which ``create_repo(exist_ok=True)`` returns
                url = f"{self.url}/{repo_id}"
                raise HubError(409, None, f"You already created this model repo: {repo_id}", fields={"url": url})
            repo = _Repo(private=payload.get("visibility", "public") != "public")
            initial = self._commit_oid(repo_id, None, {}, "initial commit")
            repo.commits[initial] = {}
            repo.branches["main"] = initial
            self._repos[repo_id] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    @staticmethod
    def validate_yaml(payload: dict) -> tuple[int, dict]:
        """Parse the front-matter of a README (``---`` ... ``---``): it must be a YAML mapping."""
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", payload.get("content", ""), re.DOTALL)
        if match:
            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                return 400, {"errors": [{"message": f"invalid YAML: {err}"}]}
            if meta is not None and not isinstance(meta, dict):
                return 400, {"errors": [{"message": "the metadata must be a YAML mapping"}]}
        return 200, {"errors": [], "warnings": []}

    def preupload(self, repo_id: str, revision: str, payload: dict) -> tuple[int, dict]:
        with self._lock:
            repo = self._repo(repo_id, authorized=True)
            files = repo.commits[repo.resolve(repo_id, revision)]
        answer = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
            for f in payload.get("files", [])
        ]
        return 200, {"files": answer, "commitOid": None}

    def commit(self, repo_id: str, revision: str, lines: list[dict], query: dict) -> tuple[int, dict]:
        if query.get("create_pr"):
            raise HubError(400, None, "the local hub does not open pull requests (create_pr)")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, None, "a commit starts with its header line")
        header = lines[0]["value"]
        written: dict[str, str] = {}  # blobs are written before the lock: a commit only names them
        for line in lines[1:]:
            if line.get("key") == "file":
                value = line["value"]
                if value.get("encoding") != "base64":
                    raise HubError(400, None, f"{value.get('path')}: only base64 file content is accepted")
                written[value["path"]] = self._store(base64.b64decode(value["content"]))
            elif line.get("key") not in ("deletedFile", "deletedFolder"):
                raise HubError(400, None, f"the local hub accepts no {line.get('key')!r} operations (no LFS)")
        with self._lock:
            repo = self._repo(repo_id, authorized=True)
            if revision not in repo.branches:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision} (not a branch of {repo_id})")
            parent = repo.branches[revision]
            if header.get("parentCommit") not in (None, parent):
                raise HubError(412, None, f"A commit has happened since {header['parentCommit']} (head: {parent})")
            files = dict(repo.commits[parent])
            for line in lines[1:]:
                path = line["value"]["path"]
                if line["key"] == "file":
                    files[path] = written[path]
                elif line["key"] == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                else:
                    prefix = path.rstrip("/") + "/"
                    files = {p: oid for p, oid in files.items() if not p.startswith(prefix)}
            oid = self._commit_oid(repo_id, parent, files, header.get("summary", ""))
            repo.commits[oid] = files
            repo.branches[revision] = oid
            self.commits.append((repo_id, header.get("summary", ""), [line["value"]["path"] for line in lines[1:]]))
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}"}

    def _commit_oid(self, repo_id: str, parent: str | None, files: dict[str, str], summary: str) -> str:
        state = json.dumps([repo_id, parent, sorted(files.items()), summary, time.time_ns()])
        return hashlib.sha1(state.encode()).hexdigest()

    def _snapshot(self, repo_id: str, revision: str | None, authorized: bool) -> tuple[_Repo, str, dict[str, str]]:
        with self._lock:
            repo = self._repo(repo_id, authorized)
            sha = repo.resolve(repo_id, revision or "main")
            return repo, sha, dict(repo.commits[sha])

    def repo_info(self, repo_id: str, revision: str | None, authorized: bool, query: dict) -> tuple[int, dict]:
        repo, sha, files = self._snapshot(repo_id, revision, authorized)
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [
            {"rfilename": path, **({"size": self._size(oid), "blobId": oid} if blobs else {})}
            for path, oid in sorted(files.items())
        ]
        modified = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo.created))
        info = {"id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha}
        info.update(private=repo.private, disabled=False, gated=False, lastModified=modified, siblings=siblings)
        return 200, info

    def tree(self, repo_id: str, revision: str, path: str | None, authorized: bool, query: dict) -> tuple[int, list]:
        _, _, files = self._snapshot(repo_id, revision, authorized)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        base = PurePosixPath(path.strip("/")) if path else None
        if base is not None and str(base) in files:
            raise HubError(400, None, f"{path} is a file, not a folder")
        entries: dict[str, dict] = {}
        for file, oid in sorted(files.items()):
            parts = PurePosixPath(file).parts
            depth = len(base.parts) if base is not None else 0
            if base is not None and parts[:depth] != base.parts:
                continue
            rest = parts[depth:]
            folders = range(1, len(rest)) if recursive else range(1, min(len(rest), 2))
            for end in folders:  # the folders on the way
                folder = "/".join(parts[: depth + end])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": git_blob_oid(folder.encode())})
            if recursive or len(rest) == 1:
                entries[file] = {"type": "file", "path": file, "size": self._size(oid), "oid": oid}
        if base is not None and not entries:
            raise HubError(404, "EntryNotFound", f"{path} does not exist in {repo_id}")
        return 200, list(entries.values())

    def resolve(self, repo_id: str, revision: str, path: str, authorized: bool) -> tuple[str, str]:
        """(commit oid, blob oid) of a file; a missing file is an ``EntryNotFound`` naming the commit."""
        _, sha, files = self._snapshot(repo_id, revision, authorized)
        if path not in files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist in {repo_id}", {"X-Repo-Commit": sha})
        return sha, files[path]

    def _size(self, oid: str) -> int:
        return (self._blobs / oid).stat().st_size


class _Handler(BaseHTTPRequestHandler):
    """Routes a request to :class:`LocalHub` and writes its JSON, file or error answer."""

    hub: LocalHub
    server_version = "mome-local-hub"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's signature
        """Quiet: the hub keeps ``hub.requests`` instead of writing to stderr."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        status = 500
        try:
            if self.client_address[0] != "127.0.0.1":
                raise HubError(403, None, "the local hub answers loopback requests only")
            split = urlsplit(self.path)
            status = self._route(method, split.path, parse_qs(split.query))
        except HubError as err:
            status = err.status
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-answer
            status = 499
        except Exception as err:  # a server bug: answer 500 and keep serving
            self._send_error(HubError(500, None, f"{type(err).__name__}: {err}"))
        finally:
            self.hub.requests.append((method, self.path, status))

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _route(self, method: str, path: str, query: dict) -> int:
        for route_method, pattern, name in _ROUTES:
            match = pattern.fullmatch(path) if route_method == method else None
            if match is None:
                continue
            groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
            if method == "POST" and not self._authorized():
                raise HubError(401, None, "Invalid credentials in Authorization header")
            handler = getattr(self, f"_{name}")
            return handler(query=query, **groups)
        raise HubError(404, None, f"the local hub does not serve {method} {path}")

    # --- one method per route ----------------------------------------------------------------------------------

    def _create_repo(self, query: dict) -> int:
        return self._send_json(*self.hub.create_repo(self._json_body()))

    def _validate_yaml(self, query: dict) -> int:
        return self._send_json(*self.hub.validate_yaml(self._json_body()))

    def _preupload(self, repo: str, rev: str, query: dict) -> int:
        return self._send_json(*self.hub.preupload(repo, rev, self._json_body()))

    def _commit(self, repo: str, rev: str, query: dict) -> int:
        try:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        except ValueError as err:
            raise HubError(400, None, f"the commit body is not NDJSON: {err}") from err
        return self._send_json(*self.hub.commit(repo, rev, lines, query))

    def _repo_info(self, repo: str, rev: str | None, query: dict) -> int:
        return self._send_json(*self.hub.repo_info(repo, rev, self._authorized(), query))

    def _tree(self, repo: str, rev: str, path: str | None, query: dict) -> int:
        return self._send_json(*self.hub.tree(repo, rev, path, self._authorized(), query))

    def _resolve(self, repo: str, rev: str, path: str, query: dict) -> int:
        commit, oid = self.hub.resolve(repo, rev, path, self._authorized())
        data = (self.hub._blobs / oid).read_bytes()
        status, body = 200, data
        headers = {"X-Repo-Commit": commit, "ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
        requested = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if requested:
            start = int(requested.group(1))
            end = int(requested.group(2)) if requested.group(2) else len(data) - 1
            if start >= len(data):
                raise HubError(416, None, f"range start {start} is past the end ({len(data)} bytes)")
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        self.send_response(status)
        for key, value in {**headers, "Content-Type": "application/octet-stream"}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    # --- bodies and answers ------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            raise HubError(411, None, "send a Content-Length (chunked bodies are not read)")
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            raise HubError(413, None, f"request body of {length} bytes is over the limit of {_MAX_BODY}")
        return self.rfile.read(length)

    def _json_body(self) -> dict:
        try:
            value = json.loads(self._body() or b"{}")
        except ValueError as err:
            raise HubError(400, None, f"the body is not JSON: {err}") from err
        if not isinstance(value, dict):
            raise HubError(400, None, "the body is not a JSON object")
        return value

    def _send_json(self, status: int, value: object, headers: dict[str, str] | None = None) -> int:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, item in (headers or {}).items():
            self.send_header(key, item)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _send_error(self, err: HubError) -> None:
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        headers.setdefault("X-Error-Message", err.message)
        self._send_json(err.status, {"error": err.message, **err.fields}, headers)


if __name__ == "__main__":  # serve until interrupted: python tests/hub_server.py [root]
    import tempfile

    with LocalHub(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="local-hub-")) as _hub:
        print(f"HF_ENDPOINT={_hub.url} HF_TOKEN={_hub.token}", flush=True)
        threading.Event().wait()
