"""Turn a ``mome-train`` Lightning checkpoint into a mome model folder (``config.json`` +
``model.safetensors``) that ``mome.create_model("local-dir:<folder>")`` loads, so trained models
re-enter the zoo::

    python tools/export.py logs/train/runs/<ts>/checkpoints/last.ckpt exported/limoe_digits

The model is rebuilt from the name and kwargs recorded in the checkpoint's hyper-parameters and its
weights are loaded strictly; the task's own parameters (optimiser state, VLMo's MIM head) stay behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mome  # noqa: E402
from mome.lit.base import model_from_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a Lightning .ckpt written by mome-train")
    parser.add_argument("output", type=Path, help="the folder to write (replaced only if it holds a mome model)")
    args = parser.parse_args(argv)
    try:
        model = model_from_checkpoint(args.checkpoint)
        folder = mome.save_pretrained(model, args.output)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(f"export: {model.mome_model_name} from {args.checkpoint} -> {folder} (load: local-dir:{folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
