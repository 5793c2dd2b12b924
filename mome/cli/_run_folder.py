"""A run never replaces an earlier run's outputs (``hydra.callbacks.run_folder`` in ``conf/hydra/default.yaml``).

Hydra creates the run's folder (``hydra.run.dir``) and writes ``.hydra/config.yaml`` into it *before* the job
starts, so a second ``mome-train`` (or ``mome-eval``) into the folder of an earlier run silently replaced that run's
recorded config, and then its exported ``model/`` (and ``results.json``). :class:`RunFolderGuard` runs at Hydra's
``on_run_start`` / ``on_multirun_start``, before anything is written:

- a folder given on the command line (``hydra.run.dir=``, ``hydra.sweep.dir=``) that already holds files is refused
  with one line and exit code 2, naming the folder and what to do; the default, timestamped folder of another run
  started in the same second gets a ``-v1`` (``-v2``, ...) suffix instead;
- except for ``mome-train ckpt_path=...`` (a resume continues its own run's folder): then Hydra records this run's
  config beside the earlier one, in ``.hydra-v1`` (``-v2``, ...), and the export goes beside the earlier one too
  (:func:`free_name`: ``model-v1``, ...);
- ``hydra.run.dir`` is fixed to its resolved value, so a ``${now:...}`` in it names the folder that was checked;
- the other processes of a distributed run (Lightning's launcher re-runs the command with ``LOCAL_RANK=1``, ...;
  torchrun and SLURM start every rank with the command) share the folder of rank 0 and are not checked.

:data:`EARLIER` holds the run folders that existed before their run started (a resume's):
:func:`mome.cli._common.run_cli` never removes those after a setup error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

__all__ = ["EARLIER", "RunFolderGuard", "free_name"]

#: Run folders (absolute) that existed before the run in them started.
EARLIER: set[Path] = set()


def free_name(path: Path) -> Path:
    """``path`` if nothing has that name, else the first free ``<name>-v1``, ``<name>-v2``, ... beside it (the
    versions Lightning gives a checkpoint name that is taken)."""
    candidate, version = path, 0
    while candidate.exists():
        version += 1
        candidate = path.with_name(f"{path.name}-v{version}")
    return candidate


#: Environment variables that a launcher sets to a process's rank (a non-zero one: not the first process).
_RANK_VARIABLES = ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID")


def _other_rank() -> bool:
    return any(os.environ.get(name, "0") not in ("", "0") for name in _RANK_VARIABLES)


def _prog(config: DictConfig) -> str:
    return f"mome-{config.hydra.job.config_name or 'train'}"


def _refuse(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class RunFolderGuard(Callback):
    """Refuse a run into a folder that holds an earlier run; let a resume write beside it (see the module)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _other_rank():
            return
        with read_write(config.hydra), open_dict(config.hydra):
            folder = Path(str(config.hydra.run.dir))
            config.hydra.run.dir = str(folder)  # resolved once: ${now:...} names the folder checked here
            if not folder.exists():
                return
            EARLIER.add(folder.absolute())
            if not any(folder.iterdir()):
                return
            prog = _prog(config)
            resume = prog == "mome-train" and config.get("ckpt_path") is not None
            if not resume and not _given(config, "hydra.run.dir"):  # the default, timestamped folder is taken
                config.hydra.run.dir = str(free_name(folder))  # (two runs started in the same second): beside it
                EARLIER.discard(folder.absolute())
                return
            if not resume:
                _refuse(
                    prog,
                    f"hydra.run.dir={folder} already holds an earlier run ({_listing(folder)}); it is not overwritten: "
                    "choose another hydra.run.dir (or remove that folder)"
                    + (", or resume that run with ckpt_path=last" if prog == "mome-train" else ""),
                )
            subdir = str(config.hydra.output_subdir or ".hydra")
            config.hydra.output_subdir = free_name(folder / subdir).name

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _other_rank():
            return
        with read_write(config.hydra), open_dict(config.hydra):
            folder = Path(str(config.hydra.sweep.dir))
            config.hydra.sweep.dir = str(folder)
            if folder.exists() and any(folder.iterdir()) and not _given(config, "hydra.sweep.dir"):
                config.hydra.sweep.dir = str(free_name(folder))
            elif folder.exists() and any(folder.iterdir()):
                _refuse(
                    _prog(config),
                    f"hydra.sweep.dir={folder} already holds an earlier sweep ({_listing(folder)}); it is not "
                    "overwritten: choose another hydra.sweep.dir (or remove that folder)",
                )


def _given(config: DictConfig, key: str) -> bool:
    """Whether the command line set ``key`` (else it is the default, timestamped folder)."""
    return any(str(o).lstrip("+~").split("=", 1)[0] == key for o in config.hydra.overrides.get("hydra", []))


def _listing(folder: Path, shown: int = 4) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:shown]) + (f", ... ({len(names)} entries)" if len(names) > shown else "")
