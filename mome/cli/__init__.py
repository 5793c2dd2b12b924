"""Command-line entry points: ``mome-train`` (:mod:`mome.cli.train`) and ``mome-eval``."""
