"""Every exception the library raises on bad input, in one place (``mome.<Name>Error``).

Each is a ``ValueError`` or ``RuntimeError`` subclass, so callers that catch the builtin keep working,
and each message names what is wrong (the model name, the file, the key, the card field).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CardError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "DownloadError",
    "PretrainedUnavailableError",
    "UnknownModelError",
    "UnsafeCheckpointError",
]


class UnknownModelError(ValueError):
    """A model name, or a tag of it, that the registry does not know."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model exactly."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, not the format its name says)."""


class CheckpointFormatError(CorruptCheckpointError):
    """A checkpoint whose format cannot be told, or is not the format it was read as; the message says
    what the file looks like and which formats were tried."""


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint that ``torch.load(weights_only=True)`` refuses (it would run code on load)."""


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights that cannot be fetched or loaded here (offline, not cached, ...)."""


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


class CardError(ValueError):
    """A checkpoint card that breaks the card schema; names the file (``path``) and the ``field``."""

    def __init__(self, path: str | Path | None, field: str | None, problem: str) -> None:
        self.path, self.field, self.problem = path, field, problem
        where = f"{path}: " if path else ""
        super().__init__(f"{where}field {field!r}: {problem}" if field else f"{where}{problem}")
