"""Bad checkpoints, saved folders and zoo command lines: each a typed one-line error naming the file, before any
work, and nothing loaded or written half-way.

- corrupt vs unsafe vs another format: random bytes, text, an empty file and a truncated zip are
  ``CorruptCheckpointError`` (``CheckpointFormatError`` where no format can be told), never ``UnsafeCheckpointError``,
  which only a real pickle importing globals gets; ``mome-train`` and ``mome-eval`` say the same for the same file;
- weights with NaN/Inf: ``NonFiniteWeightsError`` naming the file and tensors on every load route, unless
  ``allow_non_finite=True``;
- a saved folder's broken ``config.json``: a typed error naming the file and the JSON line and column;
- ``python -m mome.zoo``: bad arguments exit 2 with one ``mome.zoo <command>: error:`` line, writing nothing.
"""

from __future__ import annotations

import io
import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from train_helpers import compose_train

import mome
from mome import zoo
from mome._checkpoint import read_state_dict
from mome.cli._common import run_cli
from mome.lit.base import read_lightning_checkpoint


@mome.register_model
def _test_ckerr_mlp(pretrained: bool = False, hidden: int = 6):
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))


class _Payload:
    """Unpickling this creates a marker file (a stand-in for ``os.system``)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _torch_bytes(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _bad_bytes() -> dict[str, bytes]:
    """name -> bytes that are no checkpoint at all, or a damaged one (never a pickle that would run code)."""
    good = _torch_bytes({"state_dict": _state(_test_ckerr_mlp())})
    return {
        "random": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        .numpy()
        .tobytes(),
        "text": b"epoch,loss\n1,0.5\n" * 20,
        "empty": b"",
        "truncated_zip": good[: len(good) // 2],
        "damaged_pickle": b"\x80\x02}q\x00(X" + bytes(range(200, 256)),
    }


SUFFIXES = [".pt", ".pth", ".bin", ".ckpt", ".safetensors", ""]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_bytes_that_are_no_checkpoint_are_corrupt_not_unsafe(tmp_path, suffix):
    """Every reader (state dict, Lightning checkpoint, create_model) calls them corrupt, naming the file."""
    model = _test_ckerr_mlp()
    before = _state(model)
    for name, data in _bad_bytes().items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        readers = [read_state_dict, read_lightning_checkpoint, lambda p: mome.load_checkpoint(model, p)]
        readers.append(lambda p: mome.create_model("_test_ckerr_mlp", checkpoint_path=p))
        for read in readers:
            with pytest.raises(mome.CorruptCheckpointError, match=path.name) as info:
                read(path)
            assert not isinstance(info.value, mome.UnsafeCheckpointError), (name, suffix)
            assert isinstance(info.value, ValueError)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("legacy", [False, True])
def test_only_a_pickle_importing_globals_is_unsafe(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    weights = _state(_test_ckerr_mlp())
    obj = {"state_dict": {**weights, "0.weight": _Payload(marker)}}
    path.write_bytes(_torch_bytes(obj, _use_new_zipfile_serialization=not legacy))
    for read in (read_state_dict, read_lightning_checkpoint):
        with pytest.raises(mome.UnsafeCheckpointError, match="evil.ckpt.*weights_only"):
            read(path)
    assert not marker.exists()


def test_a_file_of_another_format_is_a_format_error_for_a_lightning_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_state(_test_ckerr_mlp()), path)
    with pytest.raises(mome.CheckpointFormatError, match=r"model.safetensors is a safetensors file with 4 tensors"):
        read_lightning_checkpoint(path)


# --------------------------------------------------------------------------- mome-train and mome-eval agree


def _cli_error(prog: str, tmp_path, overrides: list[str], capsys) -> str:
    """The one error line of ``prog`` (``mome-train`` or ``mome-eval``) run in-process, without its prefix."""
    from mome.cli.eval import _job as eval_job
    from mome.cli.train import _job as train_job

    out = tmp_path / prog
    cfg = compose_train(out, overrides, config_name="train" if prog == "mome-train" else "eval")
    (out / ".hydra").mkdir(parents=True)
    with pytest.raises(SystemExit) as info:
        run_cli(prog, train_job if prog == "mome-train" else eval_job, cfg)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, lines
    assert not out.exists()  # the run's folder is removed
    return lines[0].removeprefix(f"{prog}: error: ")


def test_mome_train_and_mome_eval_give_the_same_error_for_the_same_file(tmp_path, capsys):
    data = _bad_bytes()
    files = {name: tmp_path / f"{name}.ckpt" for name in ("random", "truncated_zip", "damaged_pickle")}
    for name, path in files.items():
        path.write_bytes(data[name])
    files["evil"] = tmp_path / "evil.ckpt"
    files["evil"].write_bytes(_torch_bytes({"state_dict": {"w": _Payload(tmp_path / "pwned")}}))
    expected = {
        "random": "CheckpointFormatError",
        "truncated_zip": "CorruptCheckpointError",
        "damaged_pickle": "CorruptCheckpointError",
        "evil": "UnsafeCheckpointError",
    }
    for name, path in files.items():
        train = _cli_error("mome-train", tmp_path, [f"ckpt_path={path}"], capsys)
        evaluate = _cli_error("mome-eval", tmp_path, [f"ckpt_path={path}"], capsys)
        assert train == evaluate, (train, evaluate)
        assert train.startswith(f"{expected[name]}: {path}"), train
    assert not (tmp_path / "pwned").exists()
    # a saved folder whose config.json was cut short, as model=local-dir:<folder>
    folder = tmp_path / "saved"
    mome.save_pretrained(mome.create_model("_test_ckerr_mlp"), folder)
    (folder / "config.json").write_text('{"architecture": "_test_ckerr_mlp", "model_')
    train = _cli_error("mome-train", tmp_path, [f"model=local-dir:{folder}"], capsys)
    evaluate = _cli_error("mome-eval", tmp_path, [f"model=local-dir:{folder}"], capsys)
    assert evaluate.startswith(f"CorruptCheckpointError: {folder / 'config.json'}: not valid JSON"), evaluate
    kind, message = evaluate.split(": ", 1)  # mome-train may put "model (<name>): " before the same message
    assert train.startswith(f"{kind}: ") and train.endswith(message), (train, evaluate)


# --------------------------------------------------------------------------- NaN and Inf in weights


def _non_finite_weights() -> dict[str, torch.Tensor]:
    weights = _state(_test_ckerr_mlp())
    weights["0.weight"][0, :2] = float("nan")
    weights["2.bias"][1] = float("inf")
    return weights


def test_non_finite_weights_are_refused_on_every_route_unless_allowed(tmp_path):
    weights = _non_finite_weights()
    path = tmp_path / "nan.safetensors"
    save_file(weights, path)
    folder = tmp_path / "saved"
    mome.save_pretrained(mome.create_model("_test_ckerr_mlp"), folder)
    save_file(weights, folder / "model.safetensors")  # a saved folder whose weights went bad

    model = _test_ckerr_mlp()
    before = _state(model)
    routes = {
        "load_checkpoint": lambda **kw: mome.load_checkpoint(model, path, **kw),
        "load_checkpoint_file": lambda **kw: mome.load_checkpoint_file(model, path, **kw),
        "checkpoint_path": lambda **kw: mome.create_model("_test_ckerr_mlp", checkpoint_path=path, **kw),
        "card": lambda **kw: mome.create_model(
            "_test_ckerr_mlp", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kw
        ),
        "local-dir": lambda **kw: mome.create_model(f"local-dir:{folder}", **kw),
    }
    for route, load in routes.items():
        with pytest.raises(mome.NonFiniteWeightsError) as info:
            load()
        message = str(info.value)
        assert "model.safetensors" in message or "nan.safetensors" in message, route
        assert "2 tensor(s)" in message and "0.weight (2 NaN, 0 Inf of 24)" in message, message
        assert "2.bias (0 NaN, 1 Inf of 2)" in message and "allow_non_finite=True" in message, message
        for key, value in model.state_dict().items():  # nothing half-loaded
            assert torch.equal(value, before[key]), (route, key)
        loaded = load(allow_non_finite=True)
        loaded = model if loaded is None or isinstance(loaded, str) else loaded
        assert torch.isnan(loaded.state_dict()["0.weight"][0, :2]).all(), route
        model.load_state_dict(before)


def test_a_converters_output_is_checked_for_non_finite_values(tmp_path):
    from mome.convert import load_converted

    weights = _non_finite_weights()
    path = tmp_path / "upstream.safetensors"
    save_file({f"net.{k}": v for k, v in weights.items()}, path)

    def strip_prefix(state, model):
        return {k.removeprefix("net."): v for k, v in state.items()}

    model = _test_ckerr_mlp()
    with pytest.raises(mome.NonFiniteWeightsError, match=r"upstream.safetensors \(converted with 'strip_prefix'\)"):
        load_converted(path, "safetensors", strip_prefix, model)
    state = load_converted(path, "safetensors", strip_prefix, model, allow_non_finite=True)
    assert torch.isinf(state["2.bias"][1])


def test_allow_non_finite_without_weights_is_refused():
    with pytest.raises(mome.UnsupportedOptionError, match="allow_non_finite"):
        mome.create_model("_test_ckerr_mlp", allow_non_finite=True)


# --------------------------------------------------------------------------- saved folders' config.json


@pytest.fixture
def saved_folder(tmp_path):
    folder = tmp_path / "saved"
    mome.save_pretrained(mome.create_model("_test_ckerr_mlp"), folder)
    return folder


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        (
            '{"architecture": "_test_ckerr_mlp", "model_ar',
            mome.CorruptCheckpointError,
            r"Unterminated string starting at \(line 1, column 37\)",
        ),
        ('{\n  "architecture": "_test_ckerr_mlp",\n}', mome.CorruptCheckpointError, r"\(line 3, column 1\)"),
        ("", mome.CorruptCheckpointError, "not valid JSON"),
        ('["_test_ckerr_mlp"]', mome.CorruptCheckpointError, "expected a JSON object, found a JSON list"),
        ('{"model_args": {}}', mome.CheckpointFormatError, "names no 'architecture'"),
        ('{"architecture": 5}', mome.CorruptCheckpointError, "field 'architecture' must be a model name, got 5"),
        ('{"architecture": "_test_ckerr_mlp", "model_args": [6]}', mome.CorruptCheckpointError, "'model_args'"),
        (
            '{"architecture": "_test_ckerr_mlp", "pretrained_cfg": {"colour": 1}}',
            mome.CorruptCheckpointError,
            r"unknown pretrained_cfg field\(s\) \['colour'\]",
        ),
        ('{"architecture": "_no_such_arch"}', mome.UnknownModelError, "'_no_such_arch' is not a registered model"),
    ],
)
def test_a_broken_config_json_is_a_typed_error_naming_the_file(saved_folder, text, error, match):
    (saved_folder / "config.json").write_text(text)
    with pytest.raises(error, match=match) as info:
        mome.create_model(f"local-dir:{saved_folder}")
    assert str(saved_folder / "config.json") in str(info.value)
    if "JSON" in str(info.value):  # a folder given as checkpoint_path: its config.json is read the same way
        with pytest.raises(mome.CorruptCheckpointError, match=match):
            mome.create_model("_test_ckerr_mlp", checkpoint_path=saved_folder)


def test_local_dir_naming_a_file_says_so(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_state(_test_ckerr_mlp()), path)
    with pytest.raises(FileNotFoundError, match="is a file, not a saved folder"):
        mome.create_model(f"local-dir:{path}")


# --------------------------------------------------------------------------- python -m mome.zoo


def _zoo_error(capsys, *argv) -> str:
    status = zoo.main(list(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert status == 2 and out == "" and len(lines) == 1, (status, out, err)
    return lines[0]


def test_zoo_convert_refuses_bad_arguments_before_any_work(tmp_path, capsys):
    good = tmp_path / "w.safetensors"
    save_file(_state(_test_ckerr_mlp()), good)
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    base = ["convert", "--file", str(good), "--arch", "_test_ckerr_mlp"]
    cases = {
        "FileExistsError: " + f"{taken} exists and is not a folder": [*base, "--out", str(taken)],
        "FileExistsError: " + f"{busy} exists and holds other files (['notes.txt'])": [*base, "--out", str(busy)],
        "FileNotFoundError: --file": ["convert", "--file", str(tmp_path / "nope.pt"), "--arch", "_test_ckerr_mlp"],
        "InvalidArgumentError: convert must be given a card NAME, or --file FILE with --arch ARCH, got '--arch'": [
            "convert",
            "--arch",
            "_test_ckerr_mlp",
        ],
        "InvalidArgumentError: --arch must be absent when a card NAME is given": ["convert", "x.y", "--arch", "a"],
        "InvalidArgumentError: --set must be NAME=VALUE with a YAML value": [*base, "--set", "hidden=[1"],
        "InvalidArgumentError: --set must be NAME=VALUE (a YAML value), got 'oops'": [*base, "--set", "oops"],
        "InvalidArgumentError: --set must be a keyword of the architecture": [*base, "--set", "pretrained=true"],
        "InvalidArgumentError: --option must be given once per name": [*base, "--option=a=1", "--option=a=2"],
        "UnknownModelError": ["convert", "--file", str(good), "--arch", "_no_such_arch"],
    }
    for expected, argv in cases.items():
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "out")]
        line = _zoo_error(capsys, *argv)
        assert line.startswith("mome.zoo convert: error: ") and expected in line, (expected, line)
    assert taken.read_text() == "mine" and sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "out").exists()


def test_zoo_convert_bad_checkpoints_write_nothing(tmp_path, capsys):
    bad = tmp_path / "random.pt"
    bad.write_bytes(_bad_bytes()["random"])
    nan = tmp_path / "nan.safetensors"
    save_file(_non_finite_weights(), nan)
    out = tmp_path / "out"
    line = _zoo_error(capsys, "convert", "--file", str(bad), "--arch", "_test_ckerr_mlp", "--out", str(out))
    assert "CheckpointFormatError" in line and "random.pt" in line
    line = _zoo_error(capsys, "convert", "--file", str(nan), "--arch", "_test_ckerr_mlp", "--out", str(out))
    assert "NonFiniteWeightsError" in line and "nan.safetensors" in line and "0.weight" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors", "random.pt"]
    argv = ["convert", "--file", str(nan), "--arch", "_test_ckerr_mlp", "--allow-non-finite", "--out", str(out)]
    assert zoo.main(argv) == 0
    assert json.loads((out / "config.json").read_text())["architecture"] == "_test_ckerr_mlp"


def test_zoo_other_subcommands_exit_2_with_one_line(tmp_path, capsys):
    assert _zoo_error(capsys, "show", "_no_such_arch.tag").startswith("mome.zoo show: error: UnknownModelError")
    assert _zoo_error(capsys, "download", "_no_such_arch").startswith("mome.zoo download: error: UnknownModelError")
    line = _zoo_error(capsys, "download", "_test_ckerr_mlp")
    assert line.startswith("mome.zoo download: error: ") and "has no pretrained weights" in line
    line = _zoo_error(capsys, "verify", "_test_ckerr_mlp", "--cache-dir", str(tmp_path))
    assert line.startswith("mome.zoo verify: error: PretrainedUnavailableError")
