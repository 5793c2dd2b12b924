"""Where the packaged ``conf/`` (Hydra configs) and ``zoo/`` (checkpoint cards) live.

In a wheel they are installed as ``mome/_conf`` and ``mome/_zoo``; in a source checkout (editable
install) they are the top-level ``conf/`` and ``zoo/`` folders.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _locate(packaged: str, top_level: str) -> Path:
    for candidate in (_PACKAGE / packaged, _PACKAGE.parent / top_level):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"mome's {top_level}/ folder was found neither at {_PACKAGE / packaged} (installed wheel) "
        f"nor at {_PACKAGE.parent / top_level} (source checkout); the installation is incomplete"
    )


def conf_dir() -> Path:
    """Folder of mome's Hydra configs (``conf/``)."""
    return _locate("_conf", "conf")


def zoo_dir() -> Path:
    """Folder of mome's checkpoint cards (``zoo/``)."""
    return _locate("_zoo", "zoo")
