"""Callbacks that interrupt a training run: SIGKILL at a step (the resume test's fault) or while a checkpoint is
written, or a clean stop."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StopAfterEpoch(L.Callback):
    """Stop ``fit`` cleanly after epoch ``epoch`` (its checkpoint written), with the LR schedule of the full run."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class KillWhileSaving(L.Callback):
    """SIGKILL this process at ``point`` of the write of ``last.ckpt`` at global step ``step``.

    ``point``: ``"while_serialising"`` (half the bytes are on disk), ``"before_rename"`` (the file is complete
    under its temporary name) or ``"after_rename"`` (renamed over ``last.ckpt``, before the folder's fsync).
    The patches are installed when the callback is built, in the training process.
    """

    def __init__(self, point: str, step: int) -> None:
        import io

        import torch

        if point not in ("while_serialising", "before_rename", "after_rename"):
            raise ValueError(f"unknown kill point {point!r}")
        real_save, real_replace = torch.save, os.replace
        dying = {"now": False}

        def die() -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        def save(obj, f, *args, **kwargs):
            name = str(getattr(f, "name", ""))
            if isinstance(obj, dict) and obj.get("global_step") == step and ".last.ckpt." in name:
                dying["now"] = True
                if point == "while_serialising":
                    blob = io.BytesIO()
                    real_save(obj, blob, *args, **kwargs)
                    f.write(blob.getvalue()[: len(blob.getvalue()) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    die()
            return real_save(obj, f, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            if dying["now"] and str(dst).endswith("last.ckpt"):
                if point == "after_rename":
                    real_replace(src, dst, *args, **kwargs)
                die()
            return real_replace(src, dst, *args, **kwargs)

        torch.save, os.replace = save, replace
