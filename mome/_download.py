"""Fetching checkpoint files: Hugging Face Hub files and snapshots, plain URLs, sha256 checks.

Hub files go through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, ``local_files_only``,
``cache_dir``). Plain URLs (GitHub release assets, public buckets) are cached under the same cache
root, in ``<cache>/mome-urls/<host>/<hash of the URL's folder>/<file name>``: files of one folder (a
sharded checkpoint) stay together. A URL is written to ``<name>.incomplete``, resumed with an HTTP
``Range`` request when the server drops the connection, checked against its sha256 and only then
renamed into place, so the cache never holds a partial or corrupt file under the final name.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path

__all__ = [
    "ChecksumMismatchError",
    "DownloadError",
    "PretrainedUnavailableError",
    "check_sha256",
    "download_url",
    "hub_download",
    "hub_snapshot",
    "is_offline",
    "sha256_file",
    "url_cache_path",
]

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
_URL_CACHE = "mome-urls"


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights that cannot be fetched or loaded here (offline, not converted, ...)."""


class DownloadError(PretrainedUnavailableError):
    """A transfer that failed (HTTP error, refused or dropped connection) after its retries."""


class ChecksumMismatchError(ValueError):
    """A file whose sha256 differs from the one its card expects (``path``, ``expected``, ``actual``)."""

    def __init__(self, path: str | Path, expected: str, actual: str, deleted: bool) -> None:
        self.path, self.expected, self.actual, self.deleted = Path(path), expected, actual, deleted
        super().__init__(
            f"{path}: sha256 {actual} does not match the expected {expected}"
            + ("; the file was deleted, try again" if deleted else "")
        )


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read now, so a changed environment counts)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or value.upper() in ("1", "ON", "YES", "TRUE")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: str | Path, expected: str | None, *, delete: bool, name: str | Path | None = None) -> None:
    """Raise :class:`ChecksumMismatchError` if ``path`` does not hash to ``expected`` (None: no check).

    With ``delete``, a mismatching file is removed first (and the blob a Hub snapshot link points to).
    ``name`` is the path the error reports (the cache path of a file still under its temporary name).
    """
    if expected is None:
        return
    path = Path(path)
    actual = sha256_file(path)
    if actual != expected.lower():
        if delete:
            target = path.resolve()
            path.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
        raise ChecksumMismatchError(name or path, expected, actual, deleted=delete)


def _cache_root(cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()


def url_cache_path(url: str, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`download_url` keeps ``url`` (under ``cache_dir`` or huggingface_hub's cache root)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    folder, _, filename = parts.path.rpartition("/")
    if not filename:
        raise ValueError(f"URL {url!r} names no file")
    key = hashlib.sha256(f"{parts.scheme}://{parts.netloc}{folder}".encode()).hexdigest()[:16]
    host = re.sub(r"[^A-Za-z0-9.\-]", "_", parts.netloc)
    return _cache_root(cache_dir) / _URL_CACHE / host / key / urllib.parse.unquote(filename)


def _fetch_once(url: str, tmp: Path, progress: bool, timeout: float) -> None:
    """One HTTP transfer into ``tmp``, resuming from its current size with a ``Range`` request."""
    from tqdm.auto import tqdm

    have = tmp.stat().st_size if tmp.exists() else 0
    headers = {"User-Agent": "mome"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the range starts at the end: restart from scratch
            tmp.unlink()
            raise ConnectionError(f"{url}: the server refused to resume at byte {have}") from err
        raise
    with response:
        resumed = have and response.status == 206
        if not resumed:
            have = 0  # the server sent the whole file: restart
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        total = have + expected if expected is not None else None
        name = tmp.name.removesuffix(".incomplete")
        with (
            open(tmp, "ab" if resumed else "wb") as f,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=name, disable=not progress) as bar,
        ):
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if expected is not None and received < expected:
            raise ConnectionError(f"{url}: the connection closed after {received} of {expected} bytes")


def download_url(
    url: str,
    *,
    sha256: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` into the cache (once) and return its path, its sha256 checked when given.

    A dropped transfer is resumed (``Range``) up to ``retries`` times; after that the partial file is
    removed and :class:`DownloadError` raised, so a later call starts afresh. A file whose sha256
    does not match is deleted (:class:`ChecksumMismatchError`), also when it was already cached.

    Raises:
        PretrainedUnavailableError: offline (``HF_HUB_OFFLINE``) or ``local_files_only`` and not cached.
        DownloadError: the server answered with an error or the transfer kept failing.
        ChecksumMismatchError: the file does not hash to ``sha256``.
    """
    dest = url_cache_path(url, cache_dir)
    if dest.is_file():
        check_sha256(dest, sha256, delete=True)
        return dest
    if local_files_only or is_offline():
        why = "local_files_only=True" if local_files_only else "offline: HF_HUB_OFFLINE is set"
        raise PretrainedUnavailableError(f"the URL {url} is not in the cache {dest.parent} ({why})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".incomplete")
    tmp.unlink(missing_ok=True)
    try:
        for attempt in range(retries + 1):
            try:
                _fetch_once(url, tmp, progress, timeout)
                break
            except urllib.error.HTTPError as err:
                raise DownloadError(f"could not download the URL {url}: HTTP {err.code} {err.reason}") from err
            except (urllib.error.URLError, ConnectionError, HTTPException, TimeoutError, OSError) as err:
                if attempt == retries:
                    raise DownloadError(
                        f"could not download the URL {url} ({retries + 1} attempts; {type(err).__name__}: {err})"
                    ) from err
                time.sleep(min(2.0**attempt * 0.1, 5.0))
        check_sha256(tmp, sha256, delete=True, name=dest)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def hub_download(
    repo_id: str,
    filename: str,
    cache_dir: str | Path | None = None,
    *,
    local_files_only: bool = False,
    revision: str | None = None,
) -> Path:
    """``huggingface_hub.hf_hub_download`` with a :class:`PretrainedUnavailableError` telling how to pre-fetch."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    options = {k: v for k, v in (("local_files_only", local_files_only), ("revision", revision)) if v}
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir, **options))
    except (OSError, EntryNotFoundError) as err:
        raise PretrainedUnavailableError(
            f"could not fetch {filename} from the Hugging Face Hub repo {repo_id} (offline or not found); "
            f"pre-fetch it where there is network with `hf download {repo_id} {filename}` into the same cache "
            f"({type(err).__name__}: {err})"
        ) from err


def hub_snapshot(
    repo_id: str,
    allow_patterns: list[str] | None,
    cache_dir: str | Path | None = None,
    *,
    local_files_only: bool = False,
    revision: str | None = None,
) -> Path:
    """``huggingface_hub.snapshot_download`` of ``allow_patterns``, with a pre-fetch hint when it fails."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    options = {k: v for k, v in (("local_files_only", local_files_only), ("revision", revision)) if v}
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=allow_patterns, cache_dir=cache_dir, **options
        )
    except (OSError, EntryNotFoundError) as err:
        raise PretrainedUnavailableError(
            f"could not fetch the Hugging Face Hub repo {repo_id} (offline or not found); pre-fetch it where "
            f"there is network with `hf download {repo_id}` into the same cache ({type(err).__name__}: {err})"
        ) from err
    return Path(folder)
