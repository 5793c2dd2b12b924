"""Fetching checkpoint files: Hugging Face Hub files and snapshots, plain URLs, sha256 checks.

:func:`fetch_checkpoint` brings the weights a card (:class:`~mome.PretrainedCfg`) names onto disk:
its ``file``, else its ``hf_hub_id`` file or whole repo, else its ``url`` (timm's order), with the
companion files a format needs (the data shards of a vmoe ``.index``).

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
from collections.abc import Callable
from http.client import HTTPException
from pathlib import Path
from typing import Any

from ._checkpoint import CONFIG_NAME, WEIGHTS_NAME
from ._errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    DownloadError,
    PretrainedUnavailableError,
    UnknownModelError,
)
from ._pretrained import TRANSFORMERS_FORMAT, PretrainedCfg

__all__ = [
    "CHECKPOINT_HINT",
    "SHA256_PATTERN",
    "cached_checkpoint",
    "check_sha256",
    "download_url",
    "fetch_checkpoint",
    "hub_download",
    "hub_snapshot",
    "is_offline",
    "sha256_file",
    "transformers_source",
    "url_cache_path",
]

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
_URL_CACHE = "mome-urls"


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


def _from_hub(fetch: Callable[..., str], what: str, command: str, **options: Any) -> Path:
    """Run a ``huggingface_hub`` fetch; a failure becomes a :class:`PretrainedUnavailableError` saying how to
    pre-fetch (``hf download <command>``). Falsy ``local_files_only`` / ``revision`` options are dropped."""
    from huggingface_hub.errors import EntryNotFoundError

    options = {k: v for k, v in options.items() if v or k not in ("local_files_only", "revision")}
    if options.get("revision"):
        what, command = f"{what} at revision {options['revision']}", f"{command} --revision {options['revision']}"
    try:
        return Path(fetch(**options))
    except (OSError, EntryNotFoundError) as err:
        why = " ".join(str(err).split())  # one line: huggingface_hub's messages span several
        raise PretrainedUnavailableError(
            f"could not fetch {what} (offline or not found); pre-fetch it where there is network with "
            f"`hf download {command}` into the same cache ({type(err).__name__}: {why})"
        ) from err


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

    return _from_hub(
        huggingface_hub.hf_hub_download,
        f"{filename} from the Hugging Face Hub repo {repo_id}",
        f"{repo_id} {filename}",
        repo_id=repo_id,
        filename=filename,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        revision=revision,
    )


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

    return _from_hub(
        huggingface_hub.snapshot_download,
        f"the Hugging Face Hub repo {repo_id}",
        repo_id,
        repo_id=repo_id,
        allow_patterns=allow_patterns,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        revision=revision,
    )


#: Appended to every "weights not available" message.
CHECKPOINT_HINT = "; or pass checkpoint_path= to load weights you have"
#: Files a Hub snapshot of a foreign checkpoint needs (Hugging Face ``save_pretrained`` folders: MoE-LLaVA).
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken", "*.py"]
#: Files of a transformers-format repo: config, safetensors weights, processor and tokenizer (no remote code)
TRANSFORMERS_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def _vmoe_shards(index: Path) -> list[str]:
    """File names of the data shards of a vmoe sharded checkpoint (``<prefix>.data-nnnnn-of-NNNNN``).

    The ``.index`` file is a msgpack map whose ``shard_count`` says how many there are (vmoe
    ``checkpoints/partitioned.py``).
    """
    import msgpack

    try:
        header = msgpack.unpackb(index.read_bytes(), raw=False, strict_map_key=False)
        count = int(header["shard_count"])
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as err:
        raise CorruptCheckpointError(f"{index}: not a vmoe checkpoint index (no shard_count): {err}") from err
    prefix = index.name.removesuffix(".index")
    return [f"{prefix}.data-{shard:05d}-of-{count:05d}" for shard in range(count)]


def _fetch(
    cfg: PretrainedCfg,
    name: str,
    cache_dir: str | Path | None,
    local_files_only: bool,
    progress: bool,
    config_only: bool = False,
) -> Path:
    """The card's checkpoint on disk: ``file``, else ``hf_hub_id``, else ``url`` (timm's order), sha256 checked.

    A foreign card without ``hf_hub_filename`` is a whole Hub repo (the snapshot folder is returned).
    A vmoe ``.index`` brings its data shards into the same folder.
    """
    if cfg.file:
        path = Path(cfg.file).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{name}: pretrained file {path} does not exist")
        if path.is_file():
            check_sha256(path, cfg.sha256, delete=False)
        return path
    sibling: Callable[[str], Path]  # fetches another file of the same folder (a shard)
    if cfg.hf_hub_id:
        revision = cfg.revision
        if cfg.is_whole_repo():
            patterns = TRANSFORMERS_PATTERNS if cfg.source_format == TRANSFORMERS_FORMAT else SNAPSHOT_PATTERNS
            patterns = [CONFIG_NAME] if config_only else patterns
            options = {"local_files_only": local_files_only, "revision": revision}
            snapshot = hub_snapshot(cfg.hf_hub_id, patterns, cache_dir, **options)
            if config_only or not cfg.hf_hub_companions:
                return snapshot
            companions = {
                folder: hub_snapshot(repo, patterns, cache_dir, local_files_only=local_files_only)
                for folder, repo in cfg.hf_hub_companions.items()
            }
            return companion_layout(f"{cfg.architecture}.{cfg.tag}", cfg.hf_hub_id, snapshot, companions, cache_dir)
        filename = cfg.hf_hub_filename or WEIGHTS_NAME
        path = hub_download(cfg.hf_hub_id, filename, cache_dir, local_files_only=local_files_only, revision=revision)
        check_sha256(path, cfg.sha256, delete=True)
        folder = filename.rpartition("/")[0]

        def sibling(file: str) -> Path:
            repo_file = f"{folder}/{file}" if folder else file
            options = {"local_files_only": local_files_only, "revision": revision}
            return hub_download(cfg.hf_hub_id, repo_file, cache_dir, **options)

    elif cfg.url:
        options = {"cache_dir": cache_dir, "local_files_only": local_files_only, "progress": progress}
        path = download_url(cfg.url, sha256=cfg.sha256, **options)
        base = cfg.url.rpartition("/")[0]

        def sibling(file: str) -> Path:
            return download_url(f"{base}/{file}", **options)

    else:
        raise UnknownModelError(f"{name} has no pretrained weights (mome.list_pretrained() lists those that do)")
    if cfg.source_format == "vmoe" and path.name.endswith(".index"):
        for shard in _vmoe_shards(path):
            sibling(shard)
    return path


def companion_layout(
    name: str, repo_id: str, snapshot: Path, companions: dict[str, Path], cache_dir: str | Path | None
) -> Path:
    """One folder (``<hub cache>/mome-layouts/<name>/``) of links to the card's snapshot, named after its repo, and to
    each companion snapshot, named by the card: the side-by-side layout an upstream loader reads (Uni-MoE's LoRA
    folder beside its base, CLIP and Whisper). Each link is replaced atomically. Returns the card's own link."""
    from huggingface_hub.constants import HF_HUB_CACHE

    root = Path(cache_dir or HF_HUB_CACHE) / "mome-layouts" / name
    root.mkdir(parents=True, exist_ok=True)
    links = {repo_id.rpartition("/")[2]: snapshot, **companions}
    for folder, target in links.items():
        link, staged = root / folder, root / f".{folder}.{os.getpid()}.tmp"
        staged.unlink(missing_ok=True)
        staged.symlink_to(Path(target).resolve(), target_is_directory=True)
        os.replace(staged, link)
    return root / repo_id.rpartition("/")[2]


def fetch_checkpoint(
    cfg: PretrainedCfg,
    name: str,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    progress: bool = True,
    config_only: bool = False,
) -> Path:
    """The checkpoint of the card ``cfg`` (called ``name`` in errors) on disk, downloaded once, sha256-checked.

    Returns the file (or, for a whole Hub repo, the snapshot folder) in the card's upstream format; with
    ``config_only``, a whole repo's snapshot holds its ``config.json`` only (the architecture, no weights).

    Raises:
        PretrainedUnavailableError: offline / ``local_files_only`` and not cached, or the transfer failed;
            the message names the format and says how to pre-fetch the file or pass ``checkpoint_path=``.
        ChecksumMismatchError: the file does not hash to the card's sha256 (a download is deleted).
    """
    try:
        return _fetch(cfg, name, cache_dir, local_files_only, progress, config_only)
    except PretrainedUnavailableError as err:
        what = f"{name}: its {'config.json' if config_only else 'weights'}"
        if cfg.source_format == TRANSFORMERS_FORMAT:
            what += " (a transformers repo, read by the model class's from_pretrained)"
        elif cfg.needs_conversion():
            what += f" (the {cfg.source_format!r} format, converted by the zoo loader with {cfg.converter!r})"
        raise type(err)(
            f"{what} {'is' if config_only else 'are'} not available here: {err}; pre-fetch "
            f"{'it' if config_only else 'them'} with `python -m mome.zoo download {name}`" + CHECKPOINT_HINT
        ) from err


def cached_checkpoint(cfg: PretrainedCfg, cache_dir: str | Path | None = None) -> Path | None:
    """Where the card's checkpoint file sits in the cache (or its ``file``), without downloading; None if absent."""
    if cfg.file:
        path = Path(cfg.file).expanduser()
        return path if path.exists() else None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        if cfg.is_whole_repo():
            return None
        filename = cfg.hf_hub_filename or WEIGHTS_NAME
        found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=cache_dir, revision=cfg.revision)
        return Path(found) if isinstance(found, str) else None
    if cfg.url:
        path = url_cache_path(cfg.url, cache_dir)
        return path if path.is_file() else None
    return None


def transformers_source(
    cfg: PretrainedCfg, cache_dir: str | Path | None, local_files_only: bool
) -> Callable[[bool], Path] | None:
    """For a transformers-format card (:data:`~mome._pretrained.TRANSFORMERS_FORMAT`): the function its entrypoint
    calls to fetch the card's repo at its revision (``config_only=True``: its ``config.json`` alone), through
    huggingface_hub's cache, offline-aware, errors naming the card. None for every other card."""
    if cfg.source_format != TRANSFORMERS_FORMAT:
        return None
    card = f"{cfg.architecture}.{cfg.tag}"

    def source(config_only: bool) -> Path:
        return fetch_checkpoint(cfg, card, cache_dir, local_files_only, progress=True, config_only=config_only)

    source.card = card  # type: ignore[attr-defined]  # the entrypoint's errors name the card
    return source
