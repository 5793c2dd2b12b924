"""Reliability: every input of the bad corpus (``tests/data/bad``, written by ``tools/make_bad_corpus.py``) gets a
clear typed error from the entry point a user calls, and nothing is left half-written; numerical guards of routing;
faults (SIGKILL while saving a model folder or a training checkpoint);
load (10,000 evaluation samples and 1,000 training steps at flat memory, slow).

Covered elsewhere and not repeated here: routing invariants (combine weights, capacity, dropless, dispatch paths
agree) in ``tests/test_routing_properties.py``; an interrupted download retried to the right checksum in
``tests/test_download.py``; a resumed run after SIGKILL equal to an uninterrupted one in ``tests/test_train_runs.py``.
"""

from __future__ import annotations

import contextlib
import filecmp
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from torch.utils.data import Subset
from train_helpers import compose_train

import mome
from mome import layers as mome_layers
from mome import zoo
from mome.data.base import BadSampleError, DataConfigError
from mome.data.conversation import ConversationDataset, ConversationFormatError
from mome.data.digits import DigitsDataModule
from mome.data.folders import CsvImageTextDataModule, CsvImageTextDataset, ImageFolderDataModule
from mome.layers import ExpertChoiceRouter, SparseMoE, TopKRouter

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "bad"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
ENTRIES = MANIFEST["entries"]
ARCH, MARKER = MANIFEST["arch"], MANIFEST["marker"]


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_bad_corpus", ROOT / "tools" / "make_bad_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_bad_corpus"] = module  # the pickled payload class is looked up there
    spec.loader.exec_module(module)
    return module


corpus_tool = _load_tool()


@mome.register_model
def _reliability_tiny_moe(pretrained: bool = False, num_experts: int = 4):
    """The architecture the corpus's checkpoints and cards are made for."""
    return corpus_tool.tiny_model(num_experts)


def _entries(kind: str) -> list[dict]:
    return [entry for entry in ENTRIES if entry["kind"] == kind]


def _ids(entries: list[dict]) -> list[str]:
    return [Path(entry["file"]).name + (f"#{entry['row']}" if "row" in entry else "") for entry in entries]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------------------------ the corpus itself


def test_corpus_regenerates_byte_for_byte(tmp_path):
    """The committed corpus is exactly what the script writes: the script and the data cannot drift."""
    corpus_tool.make_corpus(tmp_path / "bad")
    committed, fresh = _files(CORPUS), _files(tmp_path / "bad")
    assert committed == fresh
    files = [name for name in committed if (CORPUS / name).is_file()]
    _, mismatch, errors = filecmp.cmpfiles(CORPUS, tmp_path / "bad", files, shallow=False)
    assert mismatch == [] and errors == []
    size = sum((CORPUS / name).stat().st_size for name in files)
    assert size < 1_000_000, size
    assert len(ENTRIES) >= 60


# ------------------------------------------------------------------------------------------------ checkpoints

CHECKPOINTS = [e for e in _entries("checkpoint") if e["error"]]


def _error_class(name: str) -> type[Exception]:
    return getattr(mome, name)


@pytest.mark.parametrize(
    "entry",
    CHECKPOINTS,
    ids=_ids(CHECKPOINTS),
)
def test_bad_checkpoint_is_a_typed_error_and_changes_nothing(entry, tmp_path, monkeypatch):
    """create_model(checkpoint_path=...) / a card / a saved folder: the same typed error naming the file; the payload
    never runs; a model it was loaded into keeps its weights; no file appears next to it or in the cache."""
    monkeypatch.chdir(tmp_path)  # where a payload would create its marker
    folder = tmp_path / "files"
    folder.mkdir()
    path = folder / Path(entry["file"]).name
    shutil.copyfile(CORPUS / entry["file"], path)
    cache = tmp_path / "cache"
    error = _error_class(entry["error"])
    match = entry["match"]

    if entry["error"] == "ChecksumMismatchError":  # undetectable without a checksum: the card's sha256 catches it
        with pytest.raises(error, match=match) as info:
            mome.create_model(
                ARCH, pretrained=True, pretrained_cfg_overlay={"file": str(path), "sha256": entry["sha256"]}
            )
        assert not info.value.deleted and path.exists()  # a user's own file is never deleted
    else:
        with pytest.raises(error, match=match) as info:
            mome.create_model(ARCH, checkpoint_path=path, cache_dir=cache)
        assert path.name in str(info.value)
        with pytest.raises(error, match=match):
            mome.create_model(ARCH, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, cache_dir=cache)
        model = mome.create_model(ARCH)
        before = _state(model)
        with pytest.raises(error):
            mome.load_checkpoint(model, path)  # what create_model calls after building the model
        _assert_same_state(model, before)
        if path.suffix == ".safetensors":  # a saved folder whose weights file is the bad one
            saved = mome.save_pretrained(model, tmp_path / "saved")
            shutil.copyfile(path, saved / "model.safetensors")
            with pytest.raises(error, match="model.safetensors"):
                mome.create_model(f"local-dir:{saved}")
    assert isinstance(info.value, mome.MomeError) and isinstance(info.value, ValueError)  # one except clause
    assert not (tmp_path / MARKER).exists()
    assert _files(folder) == [path.name] and _files(cache) == []


def test_half_precision_checkpoint_loads_cast_to_the_model_dtype():
    """A precision change is not a mismatch: fp16 weights load into an fp32 model, values equal the fp16 ones."""
    model = mome.create_model(ARCH, checkpoint_path=CORPUS / "checkpoints" / "half_precision.safetensors")
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, corpus_tool.reference_state()[key].half().float()), key


def test_good_checkpoint_loads_exactly():
    """The control: the file the bad ones are derived from loads, exactly."""
    model = mome.create_model(ARCH, checkpoint_path=CORPUS / "checkpoints" / "good.safetensors")
    _assert_same_state(model, corpus_tool.reference_state())


# ------------------------------------------------------------------------------------------------ zoo cards

CARDS = _entries("card")


@pytest.mark.parametrize("entry", CARDS, ids=_ids(CARDS))
def test_bad_card_is_a_card_error_naming_file_and_field(entry, tmp_path, monkeypatch):
    """read_card and add_zoo_dir raise CardError naming the file and the field; the registry is left as it was."""
    monkeypatch.chdir(tmp_path)
    source = CORPUS / entry["file"]
    with pytest.raises(zoo.CardError, match=re.escape(entry["match"])) as info:
        zoo.read_card(source)
    assert info.value.field == entry["field"] and str(source) in str(info.value)

    folder = tmp_path / "zoo"
    folder.mkdir()
    shutil.copyfile(source, folder / source.name)
    shutil.copyfile(CORPUS / "cards" / "weights.safetensors", folder / "weights.safetensors")
    before = mome.list_models(f"{ARCH}*", include_tags=True)
    with pytest.raises(zoo.CardError, match=re.escape(entry["match"])):
        mome.add_zoo_dir(folder)
    assert mome.list_models(f"{ARCH}*", include_tags=True) == before
    tag = Path(entry["file"]).name.removeprefix(f"{ARCH}.").removesuffix(".yaml")
    with pytest.raises(mome.UnknownModelError):
        mome.get_pretrained_cfg(f"{ARCH}.{tag}")
    assert not (tmp_path / MARKER).exists()  # the python-tag card never ran its payload


def test_validate_card_lists_every_problem_of_a_parsed_card():
    """validate_card returns all problems at once (a user fixes a card in one pass)."""
    import yaml

    data = yaml.safe_load((CORPUS / "cards" / f"{ARCH}.missing_license.yaml").read_text())
    data.update(crop_pct=2.0, interpolation="cubic")
    fields = {error.field for error in zoo.validate_card(data)}
    assert fields == {"license", "crop_pct", "interpolation"}


# ------------------------------------------------------------------------------------------------ mome-train overrides

OVERRIDES = json.loads((CORPUS / "overrides.json").read_text())
_FAST = ["trainer.fast_dev_run=1", "logger=csv", "data.num_workers=0"]


def _run_train(out: Path, overrides: list[str], capsys) -> tuple[int, list[str]]:
    cfg = compose_train(out, [*_FAST, *overrides])
    (out / ".hydra").mkdir(parents=True, exist_ok=True)  # what Hydra writes before the job starts
    from mome.cli._common import run_cli
    from mome.cli.train import _job

    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(io.StringIO()):
        run_cli("mome-train", _job, cfg)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mome-train: error:")]
    return exit_info.value.code, lines


@pytest.mark.parametrize("case", OVERRIDES, ids=[" ".join(c["overrides"]) for c in OVERRIDES])
def test_bad_override_stops_with_one_line_and_leaves_nothing(case, tmp_path, capsys):
    """Wrong types, unknown keys, impossible values: refused before training with one line naming the field (exit 2)
    and the run's folder removed; an unknown key is refused by Hydra when composing (no run folder at all)."""
    out = tmp_path / "run"
    case = {**case, "overrides": [o.replace("{corpus}", str(CORPUS)) for o in case["overrides"]]}
    if case["stage"] == "compose":
        with pytest.raises((ConfigCompositionException, OverrideParseException, MissingConfigException)) as info:
            compose_train(out, [*_FAST, *case["overrides"]])
        assert case["match"] in str(info.value)
        return
    code, lines = _run_train(out, case["overrides"], capsys)
    assert not Path(MARKER).exists()  # the pickle payload never ran
    assert code == 2
    assert len(lines) == 1 and case["match"] in lines[0], lines
    if case["stage"] == "run":
        assert not out.exists()  # nothing half-written is left behind
    else:  # the error comes after training: the trained checkpoint is kept, not thrown away
        assert (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_unknown_key_on_the_real_command_line_creates_no_run_folder(tmp_path):
    """``mome-train data.no_such_key=1``: Hydra's error names the key, the exit status is non-zero, no logs/."""
    result = subprocess.run(
        [sys.executable, "-m", "mome.cli.train", "data.no_such_key=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "no_such_key" in result.stderr
    assert _files(tmp_path) == []


# ------------------------------------------------------------------------------------------------ the error classes


def test_every_error_mome_raises_on_bad_input_is_a_mome_error():
    """One ``except mome.MomeError`` catches every error class of the library (exported from ``mome`` and those of
    the command lines, data modules, tasks and routers), and each keeps its builtin base for older callers."""
    from mome.cli._common import ConfigError, SetupError
    from mome.data.conversation import ConversationFormatError
    from mome.layers.routers import CausalRoutingError
    from mome.lit.base import NonFiniteLossError, TaskConfigError

    exported = [getattr(mome, name) for name in dir(mome) if name.endswith("Error")]
    others = [ConfigError, SetupError, DataConfigError, BadSampleError, ConversationFormatError, TaskConfigError]
    others += [NonFiniteLossError, CausalRoutingError]
    assert len(exported) >= 15
    for cls in exported + others:
        assert issubclass(cls, mome.MomeError), cls
        assert cls is mome.MomeError or issubclass(cls, (ValueError, RuntimeError, FloatingPointError)), cls


# ------------------------------------------------------------------------------------------------ library calls

CALLS = json.loads((CORPUS / "calls.json").read_text())


def _call_id(case: dict) -> str:
    target = case.get("model") or case["layer"]
    what = case.get("method") or ",".join(f"{k}={v}" for k, v in case["kwargs"].items())
    shapes = ",".join(f"{k}{spec['shape']}" for k, spec in case.get("inputs", {}).items())
    return f"{target}:{what}" + (f"({shapes})" if shapes else "")


def _tensor(spec: dict) -> torch.Tensor:
    dtype = getattr(torch, spec["dtype"])
    if "value" in spec:
        return torch.full(spec["shape"], spec["value"], dtype=dtype)
    return torch.randn(spec["shape"], generator=torch.Generator().manual_seed(0)).to(dtype)


def _run_call(case: dict):
    if "model" in case:
        target = mome.create_model(case["model"], **(case.get("kwargs") or {}))
    else:
        target = getattr(mome_layers, case["layer"])(**case["kwargs"])
    if "method" not in case:
        return target
    target.eval()
    inputs = {name: _tensor(spec) for name, spec in case["inputs"].items()}
    with torch.no_grad():
        return getattr(target, case["method"])(**inputs)


@pytest.mark.parametrize("case", CALLS, ids=[_call_id(c) for c in CALLS])
def test_bad_call_is_a_typed_one_line_error(case):
    """A constructor argument or forward input out of range is the named ``mome`` error (a ``MomeError``), on one
    line naming the argument; an empty batch is not an error: its output is finite and of the right shape."""
    if not case["error"]:
        out = _run_call(case)
        out = out if isinstance(out, torch.Tensor) else out[0]
        assert list(out.shape) == case["shape"] and torch.isfinite(out).all()
        return
    with pytest.raises(mome.MomeError) as info:
        _run_call(case)
    assert type(info.value).__name__ == case["error"], repr(info.value)
    message = str(info.value)
    assert "\n" not in message and case["match"] in message, message


# ------------------------------------------------------------------------------------------------ data modules


@pytest.fixture(scope="module")
def image_model():
    """A 32 px model whose pretrained cfg the data modules bind their transforms to."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=2)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    return model.eval()


@pytest.fixture(scope="module")
def clip_tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16")


def test_images_that_are_not_images_raise_bad_sample_errors(image_model):
    """ImageFolderDataModule: every non-image (text named .png, empty .jpg, truncated .ppm, garbage .bmp) raises
    BadSampleError naming the file; the readable ones load; a loader stops on the bad file with the same error."""
    bad = {str(CORPUS / e["file"]) for e in _entries("image")}
    datamodule = ImageFolderDataModule(CORPUS / "images" / "folder", batch_size=2)
    datamodule.bind(image_model)
    datamodule.setup("fit")
    datamodule.setup("test")
    seen, loaded = set(), 0
    for dataset in datamodule.datasets.values():
        for index, (path, _) in enumerate(dataset.samples):
            if path in bad:
                with pytest.raises(BadSampleError, match=Path(path).name) as info:
                    dataset[index]
                assert info.value.path == path
                seen.add(path)
            else:
                assert dataset[index]["image"].shape == (3, 32, 32)
                loaded += 1
    assert seen == bad and loaded == 12
    with pytest.raises(BadSampleError):
        for _ in datamodule.train_dataloader():
            pass


CAPTION_ROWS = _entries("caption")


@pytest.mark.parametrize("entry", CAPTION_ROWS, ids=_ids(CAPTION_ROWS))
def test_caption_rows(entry, clip_tokenizer, image_model):
    """An empty caption is an empty text (2 tokens), a huge one is cut to the context length; a row naming a
    non-image or a missing file raises BadSampleError naming the file and the CSV line."""
    datamodule = CsvImageTextDataModule(train_file=CORPUS / entry["file"], batch_size=2)
    datamodule.bind(image_model, clip_tokenizer)
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    if entry["error"]:
        with pytest.raises(BadSampleError, match=entry["match"]):
            dataset[entry["row"]]
        return
    sample = dataset[entry["row"]]
    assert sample["image"].shape == (3, 32, 32) and sample["text"].shape == (77,)
    tokens = int((sample["text"] != 0).sum())
    assert tokens == (2 if entry["match"] == "empty caption" else 77)


CAPTION_FILES = _entries("caption_file")


@pytest.mark.parametrize("entry", CAPTION_FILES, ids=_ids(CAPTION_FILES))
def test_broken_caption_files_fail_at_setup(entry, clip_tokenizer, image_model):
    """A missing column, an empty image field, the wrong separator, an empty file: DataConfigError at setup."""
    datamodule = CsvImageTextDataModule(train_file=CORPUS / entry["file"], batch_size=2)
    datamodule.bind(image_model, clip_tokenizer)
    with pytest.raises(DataConfigError, match=entry["match"]):
        datamodule.setup("fit")
    with pytest.raises(DataConfigError, match=entry["match"]):
        CsvImageTextDataset(CORPUS / entry["file"], None, clip_tokenizer)


CONVERSATIONS = _entries("conversation")


@pytest.fixture(scope="module")
def llava_tokenizer():
    from mome.models.moe_llava import moe_llava_tiny_tokenizer

    return moe_llava_tiny_tokenizer()


@pytest.mark.parametrize(
    "entry",
    CONVERSATIONS,
    ids=_ids(CONVERSATIONS),
)
def test_bad_conversations_name_record_and_field(entry, llava_tokenizer):
    """Missing turns, wrong roles, a non-string value, images that do not match their placeholders, bad JSON:
    ConversationFormatError (naming the record and field) or DataConfigError, when the dataset is built."""
    from mome.models.moe_llava import TINY_IMAGE_TOKEN_ID

    def build():
        return ConversationDataset(
            CORPUS / entry["file"], llava_tokenizer, image_token_id=TINY_IMAGE_TOKEN_ID, num_image_tokens=4
        )

    if entry["error"] == "BadSampleError":  # a valid record whose image file is not an image: fails on reading
        with pytest.raises(BadSampleError, match=entry["match"]):
            build()[0]
        return
    error = ConversationFormatError if entry["error"] == "ConversationFormatError" else DataConfigError
    with pytest.raises(error, match=entry["match"].replace("[", r"\[").replace("]", r"\]")) as info:
        build()
    if error is ConversationFormatError:
        assert info.value.field.endswith(entry["match"]) and "record" in str(info.value)
    else:
        assert not isinstance(info.value, ConversationFormatError)


# ------------------------------------------------------------------------------------------------ numerical guards


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("router_kind", ["top_k", "noisy_top_k", "expert_choice", "modality_pools"])
def test_router_logits_are_fp32_for_half_inputs_and_do_not_overflow(dtype, router_kind):
    """Logits are computed in fp32 from half inputs: equal to the fp32 computation, and finite where fp16 logits
    overflow (inputs of 60,000 with weights of 1: 960,000 > fp16's 65,504)."""
    if router_kind == "expert_choice":
        router = ExpertChoiceRouter(16, 4)
    else:
        pools = [[0, 1, 2], [1, 2, 3]] if router_kind == "modality_pools" else None
        router = TopKRouter(16, 4, 2, noise_std=1.0 if router_kind == "noisy_top_k" else 0.0, modality_experts=pools)
    router = router.to(dtype).train()
    modality = torch.tensor([0, 1, 0, 1, 0, 1]) if router_kind == "modality_pools" else None
    x = torch.randn(6, 16).to(dtype)
    torch.manual_seed(1)
    routing = router(x, modality_ids=modality)
    assert routing.router_logits.dtype == torch.float32 and routing.router_probs.dtype == torch.float32
    expected = x.float() @ router.proj.weight.float().t()
    if modality is not None:
        expected = expected.masked_fill(~router.allowed_experts[modality], float("-inf"))
    torch.testing.assert_close(routing.router_logits, expected, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        router.proj.weight.fill_(1.0)
    big = torch.full((6, 16), 60000.0, dtype=dtype)
    if dtype == torch.float16:
        assert not torch.isfinite(big @ router.proj.weight.t()).all()  # what an fp16 router would compute
    routing = router(big, modality_ids=modality)
    assert torch.isfinite(routing.combine_weights).all() and torch.isfinite(routing.router_probs).all()


_ALL_LOSSES = {"load_balance": 1.0, "importance": 1.0, "load": 1.0, "z_loss": 1.0, "local_entropy": 1.0}


def _finite_forward_backward(layer, x, modality=None):
    x = x.clone().requires_grad_(True)
    out = layer(x, modality_ids=modality)
    losses = mome.aux_losses(layer)
    (out.square().sum() + sum(losses.values(), torch.zeros(()))).backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
    assert all(torch.isfinite(value).all() for value in losses.values()), losses
    assert all(torch.isfinite(value).all() for value in layer.last_routing_stats.values())
    return out, losses


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_an_expert_without_tokens_and_an_absent_modality_stay_finite(capacity_factor):
    """An expert no token is routed to, and a modality with no token in the batch: finite outputs, losses, grads."""
    layer = SparseMoE(
        8,
        16,
        4,
        2,
        router="noisy_top_k",
        capacity_factor=capacity_factor,
        aux_loss_weights={**_ALL_LOSSES, "global_entropy": 1.0},
        global_entropy_threshold=0.5,
        num_modalities=2,
    ).train()
    with torch.no_grad():
        layer.router.proj.weight[3].fill_(0.0)
        layer.router.proj.weight[3, 0] = -1000.0  # expert 3 loses every token (inputs have x[0] > 0)
    x = torch.randn(2, 6, 8)
    x[..., 0] = x[..., 0].abs() + 1
    modality = torch.zeros(2, 6, dtype=torch.long)  # modality 1 absent
    _finite_forward_backward(layer, x, modality)
    assert layer.last_routing_stats["expert_load"][3] == 0


@pytest.mark.parametrize("options", [{}, {"capacity_factor": 1.0, "dispatch": "buffers"}, {"router": "expert_choice"}])
def test_a_batch_without_tokens_gives_finite_outputs_and_gradients(options):
    """A fully masked batch (no tokens at all): an empty, finite output and finite gradients."""
    layer = SparseMoE(8, 16, 4, 2, **options).train()
    for shape in [(2, 0, 8), (0, 5, 8)]:
        out, _ = _finite_forward_backward(layer, torch.zeros(shape))
        assert out.shape == shape


def test_aux_losses_of_a_batch_without_tokens_are_zero_and_finite():
    """Every aux loss of an empty batch is exactly 0 (the layer adds nothing), with finite gradients."""
    weights = {**_ALL_LOSSES, "global_entropy": 1.0}
    layer = SparseMoE(8, 16, 4, 2, router="noisy_top_k", aux_loss_weights=weights, num_modalities=2).train()
    layer(torch.zeros(2, 0, 8), modality_ids=torch.zeros(2, 0, dtype=torch.long))
    assert {name: value.item() for name, value in layer.last_aux_losses.items()} == dict.fromkeys(weights, 0.0)
    _finite_forward_backward(layer, torch.zeros(2, 0, 8), torch.zeros(2, 0, dtype=torch.long))


def test_per_modality_losses_accept_zero_tokens():
    """The entropy losses called directly on zero tokens: 0 for every modality (no reshape error)."""
    from mome.layers import losses

    probs, ids = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    assert losses.local_entropy_loss(probs, ids, 3).tolist() == [0.0, 0.0, 0.0]
    assert losses.global_entropy_loss(probs, ids, 3, threshold=1.0).tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------ faults: SIGKILL

_KILL_POINTS = ["weights", "readme", "config", "before_swap", "after_swap", "between_renames"]


def _save_and_die(point: str, model: torch.nn.Module, target: Path) -> None:
    """In a forked child: patch the writer so that the process SIGKILLs itself at ``point`` of save_pretrained."""
    import safetensors.torch as st

    from mome import _folders

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "weights":  # half of the weights file is on disk

        def half_save(module, filename, metadata=None):
            blob = st.save(module.state_dict(), metadata=metadata)
            with open(filename, "wb") as f:
                f.write(blob[: len(blob) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()

        st.save_model = half_save
    elif point in ("readme", "config"):  # the weights are complete, the card or the config half-written
        name = {"readme": "README.md", "config": "config.json"}[point]
        write_text = Path.write_text

        def partial(self, data, *args, **kwargs):
            if self.name == name:
                write_text(self, data[: len(data) // 2])
                die()
            return write_text(self, data, *args, **kwargs)

        Path.write_text = partial
    elif point in ("before_swap", "after_swap"):  # re-saving over an earlier save, with the atomic exchange
        exchange = _folders.exchange_paths

        def exchange_and_die(first, second):
            if point == "after_swap":
                assert exchange(first, second), "renameat2(RENAME_EXCHANGE) is not available here"
            die()

        _folders.exchange_paths = exchange_and_die
    else:  # re-saving where no atomic exchange exists: killed between the two renames
        _folders.exchange_paths = lambda first, second: False
        rename = Path.rename

        def rename_and_die(self, new):
            rename(self, new)
            die()

        Path.rename = rename_and_die
    mome.save_pretrained(model, target)


def test_sigkill_while_saving_never_leaves_a_folder_that_loads_wrong(tmp_path):
    """save_pretrained killed (SIGKILL, in a forked process) at six points: the target folder either does not exist
    or loads exactly the weights of a complete save; the next save removes every hidden leftover."""
    earlier = mome.create_model(ARCH)
    torch.manual_seed(7)
    new = mome.create_model(ARCH)
    assert not all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), earlier.state_dict().values()))
    outcomes, targets = {}, {}
    for point in _KILL_POINTS:
        target = tmp_path / point / "model"
        if "swap" in point or "renames" in point:
            mome.save_pretrained(earlier, target)
        targets[point] = target
        pid = os.fork()
        if pid == 0:  # the child never returns to pytest
            try:
                _save_and_die(point, new, target)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        # what a kill leaves besides the target are hidden folders named after the dead process (.model.<pid>.*)
        leftovers = [p.name for p in target.parent.iterdir() if p.name != "model"]
        assert all(name.startswith(f".model.{pid}.") for name in leftovers), leftovers
        if not target.exists():
            outcomes[point] = "absent"
            continue
        loaded = mome.create_model(f"local-dir:{target}")
        loads_new = all(torch.equal(a, b) for a, b in zip(_state(loaded).values(), _state(new).values()))
        _assert_same_state(loaded, _state(new if loads_new else earlier))
        outcomes[point] = "loads the new save" if loads_new else "loads the earlier save"
    assert outcomes == {
        "weights": "absent",
        "readme": "absent",
        "config": "absent",
        "before_swap": "loads the earlier save",
        "after_swap": "loads the new save",
        # only without renameat2: the earlier folder was renamed aside and the new one not yet in place
        "between_renames": "absent",
    }
    # a later save to the same place succeeds and removes the hidden leftovers of the killed ones
    for target in targets.values():
        mome.save_pretrained(new, target)
        _assert_same_state(mome.create_model(f"local-dir:{target}"), _state(new))
        assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_a_save_leaves_the_hidden_folders_of_a_live_process_alone(tmp_path):
    """Stale-leftover removal only takes folders of dead processes: a concurrent save's folder survives."""
    from mome import _folders

    target = tmp_path / "model"
    running = _folders.hidden_sibling(target)  # this (live) process's own in-progress folder
    dead = tmp_path / f".model.{2**22 + 12345}.abc.tmp"  # above Linux's pid_max: no such process
    dead.mkdir()
    mome.save_pretrained(mome.create_model(ARCH), target)
    assert running.exists() and not dead.exists()


# Lightning checkpoints (mome-train's ModelCheckpoint, AtomicCheckpointIO): SIGKILL while last.ckpt is written.
_CKPT_RUN = [
    "experiment=vmoe_digits",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "test=false",
    "export=false",
    "logger=csv",
]
_CKPT_KILL_POINTS = ["while_serialising", "before_rename", "after_rename"]


def test_sigkill_while_writing_a_training_checkpoint_never_leaves_one_that_loads_wrong(tmp_path):
    """``mome-train`` killed (SIGKILL) while writing ``last.ckpt``: the name holds the complete
    step-2 checkpoint (killed before the rename) or the complete step-4 one (after it), never a truncated file;
    the run resumes from it, and its next save removes what the killed one left."""
    from mome.cli.train import train

    steps, leftovers = {}, {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    # the system temp folder on another file system (tmpfs) where there is one: where Lightning's writer copies
    temp_root = "/dev/shm" if Path("/dev/shm").is_dir() else None
    env["TMPDIR"] = tempfile.mkdtemp(prefix="mome-ckpt-kill-", dir=temp_root)
    for point in _CKPT_KILL_POINTS:
        run_dir = tmp_path / point
        kill = ["+callbacks.kill._target_=kill_helpers.KillWhileSaving", f"+callbacks.kill.point={point}"]
        command = [sys.executable, "-m", "mome.cli.train", *_CKPT_RUN, *kill, "+callbacks.kill.step=4"]
        result = subprocess.run(
            [*command, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
        checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert set(checkpoint) >= {"state_dict", "optimizer_states", "loops", "global_step"}
        steps[point] = checkpoint["global_step"]
        leftovers[point] = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.endswith(".ckpt"))
        assert all(name.startswith(".last.ckpt.") and name.endswith(".tmp") for name in leftovers[point]), leftovers
    assert steps == {"while_serialising": 2, "before_rename": 2, "after_rename": 4}
    assert [len(leftovers[p]) for p in _CKPT_KILL_POINTS] == [1, 1, 0]  # the unrenamed temporary file
    assert not any(Path(env["TMPDIR"]).iterdir())  # nothing staged in (or left in) the temp folder
    shutil.rmtree(env["TMPDIR"])

    # resuming the run killed mid-serialisation: it ends at step 6 and its saves remove the leftover
    run_dir = tmp_path / "while_serialising"
    last = run_dir / "checkpoints" / "last.ckpt"
    _, objects = train(compose_train(run_dir, [*_CKPT_RUN, f"ckpt_path={last}"]))
    assert objects["trainer"].global_step == 6
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6
    assert not [p.name for p in last.parent.iterdir() if not p.name.endswith(".ckpt")]


def test_atomic_checkpoint_io_is_the_trainers_writer_and_a_failed_write_leaves_the_target(tmp_path):
    """Every mome trainer config writes checkpoints with AtomicCheckpointIO; an error while serialising leaves
    the earlier file untouched and no temporary file behind."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from mome import _folders
    from mome.cli._common import build_trainer
    from mome.lit.checkpoint_io import AtomicCheckpointIO

    for trainer in ("cpu", "ddp_spawn", "ddp_ep", "fsdp_ep"):
        built = build_trainer(compose_train(tmp_path / trainer, [f"trainer={trainer}", "callbacks=none"]))
        assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO), trainer
    plain = build_trainer(compose_train(tmp_path / "plain", ["trainer.plugins=null", "callbacks=none"]))
    assert type(plain.strategy.checkpoint_io) is TorchCheckpointIO

    writer, target = AtomicCheckpointIO(), tmp_path / "ckpt" / "last.ckpt"
    writer.save_checkpoint({"global_step": 1, "weight": torch.ones(3)}, target)
    assert target.stat().st_mode & 0o777 == 0o666 & ~_folders.current_umask()
    with pytest.raises(AttributeError, match="pickle"):  # torch.save cannot pickle a local lambda
        writer.save_checkpoint({"global_step": 2, "bad": lambda: 0}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    assert writer.load_checkpoint(target)["global_step"] == 1


# ------------------------------------------------------------------------------------------------ load (slow)


def _memory_mb() -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of this process in MiB, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


class RepeatedDigitsDataModule(DigitsDataModule):
    """The embedded digits with every split repeated to ``num_samples`` samples (a load test of mome-eval)."""

    def __init__(self, num_samples: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_samples = num_samples

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        super().setup(stage)
        for split, dataset in list(self.datasets.items()):
            self.datasets[split] = Subset(dataset, [i % len(dataset) for i in range(self.num_samples)])


class MemoryProbe(L.Callback):
    """Records RSS after training steps 1, 100 and every 250th (into the class-level ``samples``)."""

    samples: list[tuple[int, dict[str, float]]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        step = trainer.global_step
        if step in (1, 100) or step % 250 == 0:
            MemoryProbe.samples.append((step, _memory_mb()))


@pytest.mark.slow
@pytest.mark.load
def test_eval_over_10000_samples_and_1000_training_steps_at_flat_memory(tmp_path):
    """A 1,000-step mome-train run and mome-eval over 10,000 samples (the 250 digits test images, repeated) complete,
    every sample is counted, and RSS does not grow: late in a run within 150 MiB of early in it."""
    from mome.cli.eval import evaluate
    from mome.cli.train import train

    figures: dict[str, object] = {"start": _memory_mb()}
    MemoryProbe.samples.clear()
    overrides = [
        "experiment=vmoe_digits",
        "trainer.max_steps=1000",
        "trainer.max_epochs=-1",
        "trainer.limit_val_batches=0",
        "+trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint.monitor=null",
        "+callbacks.memory._target_=test_reliability.MemoryProbe",
        "test=false",
        "logger=csv",
    ]
    started = time.perf_counter()
    _, objects = train(compose_train(tmp_path / "train", overrides))
    figures["train_seconds"] = round(time.perf_counter() - started, 1)
    assert objects["trainer"].global_step == 1000
    samples = dict(MemoryProbe.samples)
    figures["train_rss_mib_by_step"] = {step: round(m["VmRSS"]) for step, m in samples.items()}
    assert samples[1000]["VmRSS"] - samples[100]["VmRSS"] < 150, figures

    eval_overrides = [
        f"model.model_name=local-dir:{objects['export_dir']}",
        "eval_task=classification",
        "data._target_=test_reliability.RepeatedDigitsDataModule",
        "+data.num_samples=10000",
        "data.task=classification",
        "+trainer.enable_progress_bar=false",
    ]
    cfg = compose_train(tmp_path / "eval", eval_overrides, config_name="eval")
    before = _memory_mb()
    started = time.perf_counter()
    record, _ = evaluate(cfg)
    after = _memory_mb()
    figures["eval_seconds"] = round(time.perf_counter() - started, 1)
    figures["eval_rss_mib_before_after"] = (round(before["VmRSS"]), round(after["VmRSS"]))
    figures["end"] = after
    assert record["n_samples"] == 10000
    assert after["VmRSS"] - before["VmRSS"] < 150, figures
    print(f"reliability load figures: {json.dumps(figures)}")
