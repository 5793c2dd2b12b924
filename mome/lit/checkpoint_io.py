"""Lightning checkpoints written atomically beside their target (``trainer.plugins`` in ``conf/trainer``).

Lightning's ``TorchCheckpointIO`` serialises into memory and writes through an fsspec transaction, whose
local temporary file comes from ``tempfile.mkstemp()`` in the system temp folder; the commit is a
``shutil.move``. Where that folder is another file system (a tmpfs ``/tmp``, a scratch disk) the move is
a copy *into the checkpoint's own path*: a process killed during it leaves a truncated ``last.ckpt``
under the real name, and a checkpoint-sized file in ``/tmp``. :class:`AtomicCheckpointIO` writes
``.<name>.<pid>.<random>.tmp`` in the checkpoint's folder, fsyncs it and renames it over the target
(:func:`mome._folders.write_file_atomically`): the name holds the previous checkpoint or the new one,
whole, whatever the file systems; what a killed save leaves is removed by the next save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .._folders import write_file_atomically

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` whose local saves are atomic.

    Remote paths (``s3://``, ``gs://``, ...) keep Lightning's own writer (object stores publish an object
    only when its upload completes).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported")
        filesystem, local_path = url_to_fs(str(path))
        if not isinstance(filesystem, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)
        write_file_atomically(Path(local_path), lambda file: torch.save(checkpoint, file))
        return None
