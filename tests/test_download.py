"""Downloads from plain URLs against a real HTTP server on 127.0.0.1: cache, sha256, resume, offline."""

import hashlib
import http.server
import threading

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import mome
from mome import _hub


class _Server(http.server.ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes); the next ``truncate`` responses stop half-way and close the socket."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.truncate = 0
        self.requests: list[tuple[str, str | None]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server: _Server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        payload = body[start:]
        if server.truncate > 0:
            server.truncate -= 1
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the server drops the connection mid-body
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def online(monkeypatch):
    """Let downloads happen (the test suite runs with HF_HUB_OFFLINE=1); only 127.0.0.1 is contacted."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@mome.register_model(pretrained_cfgs={"web": {"url": "http://127.0.0.1:9/unused.safetensors"}})
def _test_download_mlp(pretrained: bool = False, dim: int = 6):
    return nn.Sequential(nn.Linear(dim, 8), nn.ReLU(), nn.Linear(8, 3))


def _weights_file(tmp_path):
    weights = {k: v.clone() for k, v in _test_download_mlp().state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(weights, path)
    return weights, path.read_bytes()


def _cached_files(cache):
    return sorted(p.name for p in cache.rglob("*") if p.is_file())


def test_download_success_is_cached_and_loads_through_a_card(tmp_path, server, online):
    weights, blob = _weights_file(tmp_path)
    server.files["/ckpt/w.safetensors"] = blob
    url, digest, cache = server.url("/ckpt/w.safetensors"), hashlib.sha256(blob).hexdigest(), tmp_path / "cache"

    path = _hub.download_url(url, sha256=digest, cache_dir=cache, progress=False)
    assert path.read_bytes() == blob and path == _hub.url_cache_path(url, cache)
    assert path.is_relative_to(cache / "mome-urls") and _cached_files(cache) == ["w.safetensors"]
    assert _hub.download_url(url, sha256=digest, cache_dir=cache) == path
    assert len(server.requests) == 1  # the second call used the cache

    overlay = {"url": url, "sha256": digest}
    model = mome.create_model(
        "_test_download_mlp.web", pretrained=True, cache_dir=cache, pretrained_cfg_overlay=overlay
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert len(server.requests) == 1
    # the cached copy is used offline and with local_files_only
    assert _hub.download_url(url, cache_dir=cache, local_files_only=True) == path


def test_checksum_mismatch_deletes_the_download_and_names_the_file(tmp_path, server, online):
    _, blob = _weights_file(tmp_path)
    server.files["/w.safetensors"] = blob
    url, cache, wrong = server.url("/w.safetensors"), tmp_path / "cache", "ab" * 32
    with pytest.raises(mome.ChecksumMismatchError) as info:
        _hub.download_url(url, sha256=wrong, cache_dir=cache, progress=False)
    err = info.value
    assert isinstance(err, ValueError) and mome.ChecksumMismatchError is _hub.ChecksumMismatchError
    assert err.expected == wrong and err.actual == hashlib.sha256(blob).hexdigest()
    assert err.path == _hub.url_cache_path(url, cache) and err.deleted
    message = str(err)
    assert str(err.path) in message and wrong in message and err.actual in message and "deleted" in message
    assert _cached_files(cache) == []

    # through create_model: the same typed error, the model never sees the bytes
    with pytest.raises(mome.ChecksumMismatchError, match="w.safetensors"):
        mome.create_model(
            "_test_download_mlp.web",
            pretrained=True,
            cache_dir=cache,
            pretrained_cfg_overlay={"url": url, "sha256": wrong},
        )
    assert _cached_files(cache) == []


def test_a_cached_file_that_changed_is_caught_and_deleted(tmp_path, server, online):
    _, blob = _weights_file(tmp_path)
    server.files["/w.safetensors"] = blob
    url, cache, digest = server.url("/w.safetensors"), tmp_path / "cache", hashlib.sha256(blob).hexdigest()
    path = _hub.download_url(url, sha256=digest, cache_dir=cache, progress=False)
    path.write_bytes(blob[:-1] + b"\0")
    with pytest.raises(mome.ChecksumMismatchError, match=digest):
        _hub.download_url(url, sha256=digest, cache_dir=cache, progress=False)
    assert not path.exists()


def test_interrupted_transfer_leaves_no_partial_file_and_a_retry_succeeds(tmp_path, server, online):
    _, blob = _weights_file(tmp_path)
    server.files["/w.safetensors"] = blob
    url, cache, digest = server.url("/w.safetensors"), tmp_path / "cache", hashlib.sha256(blob).hexdigest()
    server.truncate = 10  # every attempt of this call is cut off
    with pytest.raises(mome.DownloadError, match="closed after") as info:
        _hub.download_url(url, sha256=digest, cache_dir=cache, progress=False, retries=1)
    assert isinstance(info.value, mome.PretrainedUnavailableError) and url in str(info.value)
    assert len(server.requests) == 2
    assert _cached_files(cache) == []  # neither the final name nor the .incomplete file

    server.truncate = 0
    path = _hub.download_url(url, sha256=digest, cache_dir=cache, progress=False, retries=0)
    assert path.read_bytes() == blob and _cached_files(cache) == ["w.safetensors"]
    assert server.requests[-1] == ("/w.safetensors", None)  # a fresh transfer, not a resumed one


def test_a_dropped_transfer_resumes_with_a_range_request(tmp_path, server, online):
    blob = bytes(range(256)) * 4000
    server.files["/big.bin"] = blob
    server.truncate = 1
    cache = tmp_path / "cache"
    path = _hub.download_url(
        server.url("/big.bin"), sha256=hashlib.sha256(blob).hexdigest(), cache_dir=cache, progress=False
    )
    assert path.read_bytes() == blob
    (first, first_range), (second, second_range) = server.requests
    assert first == second == "/big.bin" and first_range is None
    assert second_range == f"bytes={len(blob) // 2}-"


def test_http_errors_are_typed_and_not_cached(tmp_path, server, online):
    url = server.url("/missing.safetensors")
    with pytest.raises(mome.DownloadError, match="HTTP 404.*missing.safetensors|missing.safetensors.*HTTP 404"):
        _hub.download_url(url, cache_dir=tmp_path, progress=False)
    assert len(server.requests) == 1 and _cached_files(tmp_path) == []


def test_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch, server):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = server.url("/w.safetensors")
    with pytest.raises(mome.PretrainedUnavailableError, match="HF_HUB_OFFLINE"):
        _hub.download_url(url, cache_dir=tmp_path)
    with pytest.raises(mome.PretrainedUnavailableError) as info:
        mome.create_model(
            "_test_download_mlp.web", pretrained=True, cache_dir=tmp_path, pretrained_cfg_overlay={"url": url}
        )
    message = str(info.value)
    assert "python -m mome.zoo download _test_download_mlp.web" in message and "checkpoint_path=" in message
    assert url in message and server.requests == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(mome.PretrainedUnavailableError, match="local_files_only"):
        mome.create_model(
            "_test_download_mlp.web",
            pretrained=True,
            cache_dir=tmp_path,
            local_files_only=True,
            pretrained_cfg_overlay={"url": url},
        )
    assert server.requests == []


def test_vmoe_sharded_checkpoint_brings_its_shards(tmp_path, server, online):
    msgpack = pytest.importorskip("msgpack")
    server.files["/ckpt/model.index"] = msgpack.packb({"shard_count": 2, "index": {}, "version": "20220622"})
    server.files["/ckpt/model.data-00000-of-00002"] = b"shard zero"
    server.files["/ckpt/model.data-00001-of-00002"] = b"shard one"
    cfg = mome.PretrainedCfg(url=server.url("/ckpt/model.index"), source_format="vmoe", converter="vmoe")
    cache = tmp_path / "cache"
    path = mome.fetch_pretrained(cfg.replace(architecture="_test_download_mlp", tag="vmoe"), cache_dir=cache)
    assert path.name == "model.index"
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "model.data-00000-of-00002",
        "model.data-00001-of-00002",
        "model.index",
    ]
    assert (path.parent / "model.data-00001-of-00002").read_bytes() == b"shard one"
