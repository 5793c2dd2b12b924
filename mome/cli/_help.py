"""What ``mome-train --help`` and ``mome-eval --help`` list as configuration groups, and the optional Hydra plugins.

Hydra's own help lists every group of the config folder, so ``mome-train --help`` showed ``eval_task`` (a group of
``mome-eval``; selecting it in ``mome-train`` does nothing or fails) and ``mome-eval --help`` showed ``experiment``,
``task`` and ``hparams_search``. The help template of ``conf/train.yaml`` and ``conf/eval.yaml`` calls the
``mome_config_groups`` resolver instead (:func:`config_groups`): the groups of that app's defaults list, each with
its options (the files of ``conf/<group>``).

A group option that needs an optional package (``hparams_search=optuna``: the Optuna sweeper plugin of Hydra) is in
:data:`PLUGINS`; :func:`check_plugins` stops ``mome-train``/``mome-eval`` with one line naming the pip extra before
Hydra composes the config (where a missing plugin is a long composition error).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from .._resources import conf_dir

__all__ = ["PLUGINS", "app_groups", "check_plugins", "config_groups", "missing_plugin", "register"]

#: ``(group, option) -> (module the option imports, pip requirement that installs it)``.
PLUGINS = {("hparams_search", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "mome[optuna]")}

_RESOLVER = "mome_config_groups"


def app_groups(config_name: str) -> list[str]:
    """The config groups of ``conf/<config_name>.yaml``'s defaults list (``hydra`` and groups without a folder,
    such as ``optional local``, left out), in the file's order."""
    defaults = OmegaConf.load(Path(conf_dir()) / f"{config_name}.yaml").get("defaults", [])
    groups = []
    for entry in defaults:
        if not isinstance(entry, dict) and not OmegaConf.is_dict(entry):
            continue  # _self_
        for key in entry:
            group = str(key).removeprefix("optional ").removeprefix("override ").strip()
            if group != "hydra" and (Path(conf_dir()) / group).is_dir():
                groups.append(group)
    return groups


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (Path(conf_dir()) / group).glob("*.yaml"))


def missing_plugin(group: str, option: str) -> str | None:
    """The pip requirement that installs what ``group=option`` needs, when it is not installed."""
    plugin = PLUGINS.get((group, option))
    if plugin is None:
        return None
    module, requirement = plugin
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (hydra_plugins) is missing
        found = False
    return None if found else requirement


def config_groups(config_name: str) -> str:
    """The help text's group listing of one app (``train`` or ``eval``): ``group: option, option, ...``."""
    lines = []
    for group in app_groups(config_name):
        options = []
        for option in _options(group):
            missing = missing_plugin(group, option)
            options.append(f"{option} (needs pip install '{missing}')" if missing else option)
        line = f"{group}: {', '.join(options)}"
        if group == "model":
            line += ", or any mome.create_model name (arch.tag, local-dir:<folder>, hf-hub:<repo>)"
        if group == "callbacks":
            line += " (several at once: callbacks=[default,ema])"
        lines.append(line)
    return "\n".join(lines)


def check_plugins(prog: str, argv: Sequence[str]) -> None:
    """Exit 2 with one line when a command-line override selects a group option whose plugin is not installed, or
    adds (``+group=option``) a group the app's defaults list already has (Hydra's own error names a YAML form)."""
    groups = app_groups(prog.removeprefix("mome-"))
    for arg in argv:
        key, sep, value = arg.partition("=")
        group = key.lstrip("+~").split("@")[0]
        if not sep:
            continue
        if key.startswith("+") and not key.startswith("++") and group in groups and "." not in group:
            print(
                f"{prog}: error: {arg}: {group} is a group of {prog} already: select the option with {group}={value}"
                + (" (several callbacks: callbacks=[default,...])" if group == "callbacks" else ""),
                file=sys.stderr,
            )
            raise SystemExit(2)
        for option in value.split(","):  # a multirun sweep over options: hparams_search=a,b
            missing = missing_plugin(group, option.strip())
            if missing:
                print(
                    f"{prog}: error: {group}={option.strip()} needs a Hydra plugin that is not installed: "
                    f"pip install '{missing}'",
                    file=sys.stderr,
                )
                raise SystemExit(2)


def register() -> None:
    """Register the ``mome_config_groups`` resolver the help templates call (once per process)."""
    if not OmegaConf.has_resolver(_RESOLVER):
        OmegaConf.register_new_resolver(_RESOLVER, config_groups)
