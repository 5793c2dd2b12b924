"""Reading Uni-MoE's released layout (``mome.convert.uni_moe``) beyond the fidelity cases: the folder routes, a
damaged or incomplete layout as typed errors that load nothing, and the zoo card fetching its four Hub repos
(``hf_hub_companions``) into one side-by-side layout, online then offline from the cache.

The checkpoints are copies of ``tests/data/upstream/uni_moe_speech/checkpoint/`` (written by upstream's code)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fidelity_uni_moe import ARCH, CARD, TINY, checkpoint, mome_prompt

import mome
from mome._formats import detect_format
from mome.convert.uni_moe import read_uni_moe_checkpoint

LORA = "Uni-MoE-speech-e2"


@pytest.fixture
def layout(tmp_path) -> Path:
    """A writable copy of the fixture's checkpoint folder."""
    return Path(shutil.copytree(checkpoint(), tmp_path / "checkpoint"))


def logits(model: torch.nn.Module) -> torch.Tensor:
    batch = mome_prompt("prompt_a", model.num_image_tokens, model.num_audio_tokens)
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_the_lora_folder_or_its_parent_loads_and_the_format_is_told_from_the_folder(layout):
    assert detect_format(layout / LORA) == "uni_moe"
    told = mome.create_model(ARCH, checkpoint_path=layout / LORA, **TINY)  # no checkpoint_format: detected
    parent = mome.create_model(ARCH, checkpoint_path=layout, checkpoint_format="uni_moe", **TINY)
    torch.testing.assert_close(logits(told), logits(parent), rtol=0, atol=0)
    state = read_uni_moe_checkpoint(layout / LORA)
    base = torch.load(layout / "Uni-MoE-speech-base" / "pytorch_model.bin", weights_only=True)
    adapter = torch.load(layout / LORA / "adapter_model.bin", weights_only=True)
    config = json.loads((layout / LORA / "adapter_config.json").read_text())
    key = "model.layers.2.mlp.experts.3.down_proj"  # peft's merge: W + (alpha / r) B A
    a, b = (adapter[f"base_model.model.{key}.lora_{x}.weight"] for x in "AB")
    merged = base[f"{key}.weight"] + config["lora_alpha"] / config["r"] * b @ a
    torch.testing.assert_close(state[f"{key}.weight"], merged, rtol=0, atol=1e-6)
    assert not any(k.startswith(("model.audio_tower.encoder.", "model.audio_tower.decoder.")) for k in state)


def _assert_fails_without_loading(path: Path, error: type[Exception], *texts: str) -> None:
    model = mome.create_model(ARCH, **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as err:
        mome.load_checkpoint_file(model, path, "uni_moe")
    for text in texts:
        assert text in str(err.value), (text, str(err.value))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a failed load changed the model"


def test_a_missing_or_ambiguous_companion_folder_is_named(layout):
    shutil.rmtree(layout / "whisper-tiny")
    _assert_fails_without_loading(layout / LORA, mome.CheckpointFormatError, "mm_audio_tower", "whisper-tiny")
    shutil.copytree(layout / "clip-tiny", layout / "clip-copy")
    shutil.copytree(layout / "Uni-MoE-speech-base", layout / "whisper-tiny")  # the name, but not a Whisper folder
    _assert_fails_without_loading(layout / LORA, mome.CheckpointFormatError, "no such Whisper folder", "none fits")
    shutil.rmtree(layout / "clip-tiny")  # recorded name gone, two candidates left: named, not guessed
    shutil.copytree(layout / "clip-copy", layout / "clip-other")
    _assert_fails_without_loading(layout / LORA, mome.CheckpointFormatError, "mm_vision_tower", "clip-copy")
    shutil.copytree(layout / LORA, layout / "Uni-MoE-speech-e2-copy")
    _assert_fails_without_loading(layout, mome.CheckpointFormatError, "exactly one", "Uni-MoE-speech-e2-copy")


def test_stage3_files_that_do_not_fit_the_base_are_named(layout):
    (layout / LORA / "mlp_gates.bin").unlink()
    _assert_fails_without_loading(layout / LORA, mome.CheckpointFormatError, "mlp_gates.bin is missing")


def test_an_adapter_for_a_layer_the_base_lacks_or_with_options_upstream_never_uses(layout):
    path = layout / LORA / "adapter_model.bin"
    adapter = torch.load(path, weights_only=True)
    name = "base_model.model.model.layers.9.self_attn.q_proj"
    adapter[f"{name}.lora_A.weight"], adapter[f"{name}.lora_B.weight"] = torch.zeros(8, 32), torch.zeros(32, 8)
    torch.save(adapter, path)
    _assert_fails_without_loading(layout / LORA, mome.CheckpointFormatError, "model.layers.9.self_attn.q_proj")
    config_path = layout / LORA / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "bias": "lora_only"}))
    _assert_fails_without_loading(layout / LORA, mome.UnsupportedOptionError, "bias", "lora_only")


def test_a_base_without_an_expert_is_a_mismatch_naming_the_upstream_key(layout):
    path = layout / "Uni-MoE-speech-base" / "pytorch_model.bin"
    base = torch.load(path, weights_only=True)
    for part in ("gate_proj", "up_proj", "down_proj"):
        base.pop(f"model.layers.1.mlp.experts.2.{part}.weight")
    torch.save(base, path)
    adapter = torch.load(layout / LORA / "adapter_model.bin", weights_only=True)
    adapter = {k: v for k, v in adapter.items() if ".layers.1.mlp.experts.2." not in k}
    torch.save(adapter, layout / LORA / "adapter_model.bin")
    _assert_fails_without_loading(
        layout / LORA, mome.CheckpointMismatchError, "model.layers.1.mlp.experts.2.gate_proj.weight", "lacks"
    )


class _Runs:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_a_stage3_file_with_code_is_refused_unread(layout, capsys):
    (layout / LORA / "mlp_gates.bin").write_bytes(pickle.dumps({"model.layers.0.mlp.gate.weight": _Runs()}))
    _assert_fails_without_loading(layout / LORA, mome.UnsafeCheckpointError, "mlp_gates.bin")
    assert "this pickle ran code" not in capsys.readouterr().out


UPLOAD = r"""
import sys
import huggingface_hub as hf
for pair in sys.argv[1:]:
    repo, folder = pair.split("=", 1)
    hf.create_repo(repo)
    hf.upload_folder(repo_id=repo, folder_path=folder)
"""

#: loads the card (argv[1]: the kwargs as JSON), prints the first logits and where the card's folder came from
LOAD = r"""
import json, sys
import mome
from mome._hub import fetch_checkpoint
model = mome.create_model(sys.argv[1], pretrained=True, **json.loads(sys.argv[2]))
print(fetch_checkpoint(mome.get_pretrained_cfg(sys.argv[1]), sys.argv[1]))
"""


@pytest.mark.slow
def test_the_card_fetches_its_four_hub_repos_into_one_layout(tmp_path):
    """The card's ``hf_hub_id`` and ``hf_hub_companions`` served by a local Hub (the fixture's folders under the
    card's repo names): the model loads online, then offline from the cache, equal to the local files' model."""
    from hub_server import LocalHub

    cfg = mome.get_pretrained_cfg(CARD)
    folders = {cfg.hf_hub_id: checkpoint() / LORA}
    local = {"Uni-MoE-speech-base": "Uni-MoE-speech-base", "clip-vit-large-patch14-336": "clip-tiny"}
    local["whisper-small"] = "whisper-tiny"
    for name, repo in cfg.hf_hub_companions.items():
        folders[repo] = checkpoint() / local[name]
    expected = logits(mome.create_model(ARCH, checkpoint_path=checkpoint() / LORA, **TINY))
    kwargs = json.dumps(TINY)
    with LocalHub(tmp_path / "server") as server:
        uploaded = server.run_python(UPLOAD, tmp_path / "hf_home", *(f"{r}={f}" for r, f in folders.items()))
        assert uploaded.returncode == 0, uploaded.stderr
        for offline in ("0", "1"):
            env = server.client_env(tmp_path / "hf_home", HF_HUB_OFFLINE=offline)
            run = subprocess.run(
                [sys.executable, "-c", LOAD, CARD, kwargs], env=env, capture_output=True, text=True, timeout=300
            )
            assert run.returncode == 0, run.stderr
            lora = Path(run.stdout.strip().splitlines()[-1])
            assert lora.name == "Uni-MoE-speech-e2" and lora.parent.name == CARD
            assert sorted(p.name for p in lora.parent.iterdir()) == sorted([lora.name, *cfg.hf_hub_companions])
            card_model = mome.create_model(ARCH, checkpoint_path=lora, **TINY)
            torch.testing.assert_close(logits(card_model), expected, rtol=0, atol=0)


def _set_arguments(kwargs: dict) -> list[str]:
    """``--set key=<YAML value>`` for each model kwarg."""
    import yaml

    return [part for key, value in kwargs.items() for part in ("--set", f"{key}={yaml.safe_dump(value).strip()}")]


def test_the_zoo_cli_converts_a_local_copy_through_the_card(tmp_path, recwarn):
    """``python -m mome.zoo convert NAME --file FILE --out DIR`` (zoo/README) on the LoRA folder of a local layout:
    the saved folder loads as the same model."""
    from mome import zoo

    out = tmp_path / "converted"
    zoo.main(["convert", CARD, "--file", str(checkpoint() / LORA), "--out", str(out), *_set_arguments(TINY)])
    saved = mome.create_model(f"local-dir:{out}")
    direct = mome.create_model(ARCH, checkpoint_path=checkpoint() / LORA, **TINY)
    torch.testing.assert_close(logits(saved), logits(direct), rtol=0, atol=0)
    assert saved.config.audio_connector == "whisper_decoder" and saved.pretrained_cfg.paper_ids == "arXiv:2405.11273"
