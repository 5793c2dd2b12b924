"""Command-line entry points: ``mome-train`` (:mod:`mome.cli.train`) and ``mome-eval`` (:mod:`mome.cli.eval`).

Importing this package registers the ``mome-model://`` Hydra config source that ``conf/train.yaml`` and
``conf/eval.yaml`` search for ``model=<any create_model name>`` (:mod:`mome.cli._model_source`).
"""

from ._help import register as _register_help
from ._model_source import register as _register_model_source

_register_model_source()
_register_help()  # the mome_config_groups resolver of the --help templates
