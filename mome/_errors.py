"""Every exception the library raises on bad input, in one place (``mome.<Name>Error``).

All derive from :class:`MomeError`, so ``except mome.MomeError`` catches every bad-input error the library
raises. Each is also a ``ValueError`` or ``RuntimeError`` subclass, so callers that catch the builtin keep
working, and each message names what is wrong (the argument, the model name, the file, the key, the card field).

The hierarchy::

    MomeError
    |-- InvalidArgumentError      a constructor/function argument (names it, what was expected, what came)
    |   `-- UnsupportedOptionError  an option the family or layer does not use (rejected, never ignored)
    |-- InvalidInputError         a forward input: rank, channels, size, dtype, ids outside the vocabulary
    |-- UnsupportedModelError     a model whose structure a function does not handle (e.g. upcycling a CNN)
    |-- UnknownModelError
    |-- CheckpointMismatchError   keys or shapes differ from the model's (strict, with a readable diff)
    |-- CorruptCheckpointError    bytes that cannot be read as the format they claim
    |   `-- CheckpointFormatError   a format that cannot be told, or is not the one it was read as
    |-- UnsafeCheckpointError     a pickle that would run code on load
    |-- NonFiniteWeightsError     weights with NaN or Inf (``allow_non_finite=True`` loads them)
    |-- DeviceMapError            a device map that does not fit (an unknown device or layer, too little max_memory)
    |-- ChecksumMismatchError, CardError
    |-- ProcessorMismatchError    a processor whose token ids or vocabulary do not fit its model's config
    `-- PretrainedUnavailableError, DownloadError
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CardError",
    "InvalidArgumentError",
    "InvalidInputError",
    "MomeError",
    "NonFiniteWeightsError",
    "UnsupportedModelError",
    "UnsupportedOptionError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "DeviceMapError",
    "DownloadError",
    "PretrainedUnavailableError",
    "ProcessorMismatchError",
    "UnknownModelError",
    "UnsafeCheckpointError",
]


class MomeError(Exception):
    """The base of every error mome raises on bad input or an unusable resource."""


class InvalidArgumentError(MomeError, ValueError):
    """An argument outside what a constructor or function accepts.

    ``argument`` names it, ``expected`` says what is accepted, ``got`` is what came; ``owner`` (optional)
    names the class or function, e.g. ``vmoe_tiny_patch8_e4: img_size must be divisible by patch_size=8, got 30``.
    """

    def __init__(self, argument: str, expected: str, got: object, owner: str | None = None) -> None:
        self.argument, self.expected, self.got, self.owner = argument, expected, got, owner
        where = f"{owner}: " if owner else ""
        super().__init__(f"{where}{argument} must be {expected}, got {got!r}")


class UnsupportedOptionError(InvalidArgumentError):
    """An option the model family or layer does not use; rejected by name instead of silently ignored."""

    def __init__(self, argument: str, owner: str, reason: str, got: object = None) -> None:
        self.argument, self.expected, self.got, self.owner = argument, "absent", got, owner
        ValueError.__init__(self, f"{owner} does not take {argument}={got!r}: {reason}")


class InvalidInputError(MomeError, ValueError):
    """A forward input of the wrong rank, channels, size or dtype, or with values outside their range
    (token ids beyond the vocabulary, modality ids beyond the modalities); ``argument`` names the input."""

    def __init__(self, argument: str, expected: str, got: object, owner: str | None = None) -> None:
        self.argument, self.expected, self.got, self.owner = argument, expected, got, owner
        where = f"{owner}: " if owner else ""
        got_text = got if isinstance(got, str) else repr(got)
        super().__init__(f"{where}{argument} must be {expected}, got {got_text}")


class UnsupportedModelError(MomeError, ValueError, TypeError):
    """A model (module) whose structure a function does not handle; the message names its class and what is
    handled (e.g. :func:`mome.upcycle` of a model that is not a timm ViT, an open_clip CLIP or a causal LM)."""


class UnknownModelError(MomeError, ValueError):
    """A model name, or a tag of it, that the registry does not know."""


class CheckpointMismatchError(MomeError, ValueError):
    """A checkpoint whose keys or shapes do not match the model exactly."""


class CorruptCheckpointError(MomeError, ValueError):
    """A checkpoint file that cannot be read (truncated, not the format its name says)."""


class CheckpointFormatError(CorruptCheckpointError):
    """A checkpoint whose format cannot be told, or is not the format it was read as; the message says
    what the file looks like and which formats were tried."""


class UnsafeCheckpointError(MomeError, ValueError):
    """A pickled checkpoint that ``torch.load(weights_only=True)`` refuses (it would run code on load)."""


class NonFiniteWeightsError(MomeError, ValueError):
    """Weights holding NaN or Inf; the message names the file and the first tensors. Loading them anyway takes an
    explicit ``allow_non_finite=True``."""


class DeviceMapError(MomeError, ValueError):
    """A ``device_map`` or ``max_memory`` of ``create_model`` that does not fit: a device that is not one or is not
    available here, a layer the map names that the model lacks or one it does not place, or weights larger than
    ``max_memory``; the one-line message names the layer or the device."""


class PretrainedUnavailableError(MomeError, RuntimeError):
    """Pretrained weights that cannot be fetched or loaded here (offline, not cached, ...)."""


class DownloadError(PretrainedUnavailableError):
    """A transfer that failed (HTTP error, refused or dropped connection) after its retries."""


class ChecksumMismatchError(MomeError, ValueError):
    """A file whose sha256 differs from the one its card expects (``path``, ``expected``, ``actual``)."""

    def __init__(self, path: str | Path, expected: str, actual: str, deleted: bool) -> None:
        self.path, self.expected, self.actual, self.deleted = Path(path), expected, actual, deleted
        super().__init__(
            f"{path}: sha256 {actual} does not match the expected {expected}"
            + ("; the file was deleted, try again" if deleted else "")
        )


class ProcessorMismatchError(MomeError, ValueError):
    """A processor (tokenizer + image processor) that does not fit the model it is paired with: its image / video
    / audio placeholder token is another id than the model's config says, or its vocabulary is larger than the
    model's embedding; the message names the model or card and every field that disagrees."""


class CardError(MomeError, ValueError):
    """A checkpoint card that breaks the card schema; names the file (``path``) and the ``field``."""

    def __init__(self, path: str | Path | None, field: str | None, problem: str) -> None:
        self.path, self.field, self.problem = path, field, problem
        where = f"{path}: " if path else ""
        super().__init__(f"{where}field {field!r}: {problem}" if field else f"{where}{problem}")
