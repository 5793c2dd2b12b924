"""The ``mome-model://`` Hydra config source: ``model=<name>`` for any name ``mome.create_model`` takes.

``conf/model/<name>.yaml`` holds a config for every registered variant, but ``create_model`` takes more
names than there are files: ``arch.tag`` (a pretrained card), ``local-dir:<folder>`` (a saved model) and
``hf-hub:<org/repo>``. ``conf/train.yaml`` and ``conf/eval.yaml`` put this source on Hydra's search path
(``hydra.searchpath: [mome-model://]``) *after* the ``conf/`` folder, so ``model=<name>`` selects the
file of ``conf/model`` when there is one and otherwise this source's node

    {_target_: mome.create_model, model_name: <name>}

which is the same kind of model spec as the files (see ``conf/model/*.yaml``). It composes like any group
option: ``--cfg job`` prints it, ``+model.num_classes=10`` extends it, ``moe=<recipe>`` merges into it. The
source answers every name under ``model/`` without looking it up (an ``hf-hub:`` repo cannot be checked
offline): a name ``create_model`` refuses fails when the run builds the model, with ``create_model``'s own
one-line error (unknown model, with close matches; no ``config.json`` in a ``local-dir:`` folder).

Hydra's override grammar takes ``:``, ``/``, ``.`` and ``\\`` in an unquoted value, so
``model=local-dir:logs/train/default/model`` and ``model=hf-hub:org/repo`` need no quoting.

Importing :mod:`mome.cli` registers the source (:func:`register`); Hydra finds config sources through its
plugin registry, and a source registered in the process is all that ``hydra.main`` and ``compose`` need.
"""

from __future__ import annotations

from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigResult, ConfigSource
from omegaconf import OmegaConf

__all__ = ["ModelNameSource", "register"]

GROUP = "model"
TARGET = "mome.create_model"


class ModelNameSource(ConfigSource):
    """Answers ``model/<name>`` with ``{_target_: mome.create_model, model_name: <name>}`` (see the module)."""

    @staticmethod
    def scheme() -> str:
        return "mome-model"

    @staticmethod
    def _model_name(config_path: str) -> str | None:
        group, sep, name = config_path.partition("/")
        name = name.removesuffix(".yaml")  # Hydra appends .yaml to every config path it looks up
        return name if group == GROUP and sep and name else None

    def load_config(self, config_path: str) -> ConfigResult:
        name = self._model_name(config_path)
        if name is None:
            raise ValueError(f"{self.full_path()} holds configs of the '{GROUP}' group only, not {config_path!r}")
        node = OmegaConf.create({"_target_": TARGET, "model_name": name})
        return ConfigResult(provider=self.provider, path=self.full_path(), config=node, header={"package": None})

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") == GROUP

    def is_config(self, config_path: str) -> bool:
        return self._model_name(config_path) is not None

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        """The registered architectures and ``arch.tag`` names (``--help`` and shell completion show them)."""
        if config_path.strip("/") != GROUP or results_filter == ObjectType.GROUP:
            return []
        import mome

        return sorted({*mome.list_models(exclude_filters="_*"), *mome.list_pretrained()})


def register() -> None:
    """Register :class:`ModelNameSource` with Hydra (idempotent)."""
    Plugins.instance().register(ModelNameSource)
