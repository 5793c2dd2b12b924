"""``hf-hub:<org/repo>`` for a Hub repo of a transformers MoE VLM (:mod:`mome.models.hf_moe_vlm`): a repo that
``hf_moe_vlm.save_tiny`` wrote (the tiny model and its processor), served by the local Hub endpoint of
``tests/hub_server.py``, loads with ``mome.create_model("hf-hub:...", pretrained=True)`` through huggingface_hub's
cache with the family class's ``from_pretrained``, and ``mome-eval`` finds its processor in the same cached
snapshot: online, then offline from the cache. A file missing offline, a repo without a processor and a processor
that does not fit the model are one-line typed errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mome

pytest.importorskip("transformers")
from hub_server import LocalHub  # noqa: E402
from test_eval_cli import FAST, _fails_early, compose_eval  # noqa: E402
from test_hf_moe_vlm_cards import _offline  # noqa: E402
from test_hf_moe_vlm_eval import WORDS  # noqa: E402

from mome.cli.eval import evaluate  # noqa: E402
from mome.models import hf_moe_vlm as H  # noqa: E402

REPO = "org/tiny-qwen3-vl-moe"  # save_tiny's folder: model and processor
NO_PROCESSOR = "org/tiny-no-processor"  # the model alone
MISMATCH = "org/tiny-mismatch"  # its config's image token id is not the processor's

#: uploads each folder (argv: repo=folder ...) to the local hub, then fetches it as mome does (the transformers
#: files of the repo), with huggingface_hub alone: the cache the offline tests read
UPLOAD = r"""
import sys
import huggingface_hub as hf
patterns = sys.argv[1].split(",")
for pair in sys.argv[2:]:
    repo, folder = pair.split("=", 1)
    hf.create_repo(repo)
    hf.upload_folder(repo_id=repo, folder_path=folder)
    print(hf.snapshot_download(repo, allow_patterns=patterns))
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The local hub serving the three repos, and an ``HF_HOME`` whose cache holds their snapshots."""
    from mome._hub import TRANSFORMERS_PATTERNS

    root = tmp_path_factory.mktemp("hf-vlm-hub")
    folder = H.save_tiny(root / "tiny", "qwen3_vl_moe", WORDS)
    bare = root / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("processor_config.json", "tokenizer*", "chat_*"))
    mismatch = root / "mismatch"
    shutil.copytree(folder, mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["image_token_id"] = 99  # the processor's <|image_pad|> is 100
    (mismatch / "config.json").write_text(json.dumps(config))
    with LocalHub(root / "server") as server:
        pairs = [f"{REPO}={folder}", f"{NO_PROCESSOR}={bare}", f"{MISMATCH}={mismatch}"]
        uploaded = server.run_python(UPLOAD, root / "hf_home", ",".join(TRANSFORMERS_PATTERNS), *pairs)
        assert uploaded.returncode == 0, uploaded.stderr
        yield server, root / "hf_home", folder


def _offline_cache(monkeypatch, tmp_path, hf_home) -> Path:
    """Offline, with a copy of ``hf_home``'s cache (which a test may damage) as huggingface_hub's cache."""
    cache = tmp_path / "cache"
    shutil.copytree(Path(hf_home) / "hub", cache, symlinks=True)
    _offline(monkeypatch, cache)
    return cache


def _snapshot(cache: Path, repo: str) -> Path:
    (snapshot,) = (cache / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir()
    return snapshot


def _one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def test_a_hub_repo_loads_offline_from_the_cache_with_its_processor(monkeypatch, tmp_path, hub):
    _, hf_home, folder = hub
    cache = _offline_cache(monkeypatch, tmp_path, hf_home)
    model = mome.create_model(f"hf-hub:{REPO}", pretrained=True)
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration" and not model.training
    assert model.mome_model_name == f"hf-hub:{REPO}"
    assert Path(model.config._name_or_path) == _snapshot(cache, REPO)  # read from the cached snapshot
    local = mome.create_model(f"local-dir:{folder}")
    assert list(model.state_dict()) == list(local.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
    processor = H.folder_processor(model, f"hf-hub:{REPO}")  # the repo's processor, from the same snapshot
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert processor.tokenizer.get_vocab() == H.folder_processor(local, "local").tokenizer.get_vocab()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # never asked: files only from the cache
    again = mome.create_model(f"hf-hub:{REPO}", cache_dir=cache, local_files_only=True)
    assert Path(again.config._name_or_path) == _snapshot(cache, REPO)
    with pytest.raises(mome.UnsupportedOptionError, match="checkpoint_path.*transformers save_pretrained folder"):
        mome.create_model(f"hf-hub:{REPO}", checkpoint_path="weights.safetensors")


@pytest.mark.parametrize("listing", [True, False], ids=["with-tree-listing", "without-tree-listing"])
def test_a_file_missing_offline_names_the_repo_and_the_file(monkeypatch, tmp_path, hub, listing):
    """The weights gone from the cached snapshot: huggingface_hub's cached listing of the repo tells (an incomplete
    snapshot), or without one mome's check of the files ``from_pretrained`` reads; either is one line naming the
    model, the repo and the file, with the command that pre-fetches it."""
    cache = _offline_cache(monkeypatch, tmp_path, hub[1])
    (_snapshot(cache, REPO) / "model.safetensors").unlink()
    trees = cache / f"models--{REPO.replace('/', '--')}" / "trees"
    if not listing:
        shutil.rmtree(trees)
    else:
        assert any(trees.iterdir())
    with pytest.raises(mome.PretrainedUnavailableError) as err:
        mome.create_model(f"hf-hub:{REPO}", pretrained=True)
    text = _one_line(err)
    assert text.startswith(f"hf-hub:{REPO}: ") and "model.safetensors" in text and f"hf download {REPO}" in text


def test_a_processor_file_missing_offline_names_the_repo_and_the_file(monkeypatch, tmp_path, hub):
    cache = _offline_cache(monkeypatch, tmp_path, hub[1])
    (_snapshot(cache, REPO) / "tokenizer.json").unlink()
    with pytest.raises(mome.PretrainedUnavailableError) as err:
        mome.create_model(f"hf-hub:{REPO}", pretrained=True)
    text = _one_line(err)
    assert text.startswith(f"hf-hub:{REPO}: ") and "tokenizer.json" in text and f"hf download {REPO}" in text


@pytest.fixture
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return ["data=shapes", f"data.root={root}", "data.train_size=4", "data.val_size=4", "data.test_size=6"]


@pytest.mark.parametrize("task", ["vqa", "zero_shot"])
def test_a_hub_repo_without_a_processor_fails_early(monkeypatch, tmp_path, capsys, hub, shapes, task):
    _offline_cache(monkeypatch, tmp_path, hub[1])
    model = mome.create_model(f"hf-hub:{NO_PROCESSOR}", pretrained=True)  # the model alone loads
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    data = shapes if task == "vqa" else ["data=digits"]
    line = _fails_early(tmp_path, capsys, [f"model=hf-hub:{NO_PROCESSOR}", f"eval_task={task}", *data], "processor")
    assert line.startswith(f"mome-eval: error: TaskConfigError: eval_task={task}: hf-hub:{NO_PROCESSOR} has no")
    assert "processor_config.json" in line


def test_a_hub_processor_that_does_not_fit_the_model_fails_early(monkeypatch, tmp_path, capsys, hub, shapes):
    _offline_cache(monkeypatch, tmp_path, hub[1])
    line = _fails_early(tmp_path, capsys, [f"model=hf-hub:{MISMATCH}", "eval_task=vqa", *shapes], "does not fit")
    assert line == (
        f"mome-eval: error: ProcessorMismatchError: hf-hub:{MISMATCH}: the processor does not fit the model: its "
        "image token '<|image_pad|>' is id 100, config.image_token_id is 99"
    )


@pytest.mark.slow
def test_mome_eval_on_a_hub_repo_online_then_offline_from_the_cache(monkeypatch, tmp_path, hub, shapes):
    """The commands of docs/hf_moe_vlms.md: ``mome-eval model=hf-hub:ORG/REPO eval_task=vqa data=shapes`` online
    (a fresh cache, the console command), then offline from that cache, and ``eval_task=zero_shot data=digits``
    offline; each gives the predictions and metrics of the same run on ``model=local-dir:`` of the folder the repo
    was uploaded from."""
    server, _, folder = hub
    hf_home = tmp_path / "hf_home"
    vqa = [f"model=hf-hub:{REPO}", "eval_task=vqa", *shapes, *FAST, "max_samples=3", "eval_task.max_new_tokens=3"]
    online = subprocess.run(
        [sys.executable, "-m", "mome.cli.eval", *vqa, f"hydra.run.dir={tmp_path / 'online'}"],
        cwd=tmp_path,
        env=server.client_env(hf_home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert online.returncode == 0, online.stderr[-3000:]
    assert any(path.endswith("model.safetensors") for _, path, _ in server.requests)

    def predictions(out):
        return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]

    cache = hf_home / "hub"
    _offline(monkeypatch, cache)
    requests = len(server.requests)
    record, objects = evaluate(compose_eval(tmp_path / "offline", vqa))
    assert len(server.requests) == requests  # offline: nothing asked of the hub
    assert Path(objects["task"].model.config._name_or_path) == _snapshot(cache, REPO)
    assert record["model"] == f"hf-hub:{REPO}" and record["n_samples"] == 3
    local = [f"model=local-dir:{folder}", *vqa[1:]]
    evaluate(compose_eval(tmp_path / "local", local))
    expected = predictions(tmp_path / "local")
    assert predictions(tmp_path / "online") == predictions(tmp_path / "offline") == expected and len(expected) == 3

    zero_shot = ["eval_task=zero_shot", "data=digits", *FAST, "max_samples=3", "eval_task.templates=['{}']"]
    hub_record, _ = evaluate(compose_eval(tmp_path / "zs_hub", [f"model=hf-hub:{REPO}", *zero_shot]))
    local_record, _ = evaluate(compose_eval(tmp_path / "zs_local", [f"model=local-dir:{folder}", *zero_shot]))
    assert len(server.requests) == requests
    assert hub_record["metrics"] == local_record["metrics"] and hub_record["n_samples"] == 3
    assert json.loads((tmp_path / "zs_hub" / "routing.json").read_text())["layers"]


def test_the_weights_files_are_the_shards_of_the_index(tmp_path):
    """``weights_files``: what ``from_pretrained`` reads, checked on a folder transformers' ``save_pretrained`` wrote
    in shards, and on a single file; an index without a ``weight_map`` is a typed error naming it."""
    model = mome.create_model("qwen3_vl_moe_tiny")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(path.name for path in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and H.weights_files(tmp_path / "sharded") == shards
    model.save_pretrained(tmp_path / "single")
    assert H.weights_files(tmp_path / "single") == ["model.safetensors"]
    (tmp_path / "single" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(mome.CorruptCheckpointError, match=r"model.safetensors.index.json: not a safetensors index"):
        H.weights_files(tmp_path / "single")
