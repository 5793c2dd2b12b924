"""timm interop: after ``import mome``, timm's own registry builds mome's timm-contract families
(``timm.create_model("vmoe_s32_e8")``), loads a folder ``mome.save_pretrained`` wrote (``local-dir:``) and a
repo ``mome.push_to_hub`` wrote (``hf-hub:``, against the local Hub endpoint of ``tests/hub_server.py``)."""

from __future__ import annotations

import timm
import torch

import mome
from mome.models import MoEVisionTransformer


def _same(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_every_timm_contract_family_is_in_timms_registry():
    mome_names = mome.list_models(["vmoe_*", "soft_moe_vit_*"])
    assert mome_names and set(mome_names) <= set(timm.list_models())
    assert set(timm.list_models(module="vmoe")) >= set(mome.list_models("vmoe_*"))
    assert not any(name.startswith(("limoe", "vlmo", "moe_llava")) for name in timm.list_models())  # open_clip/HF


def test_timm_create_model_builds_the_same_model_as_mome():
    for name in ("vmoe_tiny_patch8_e4", "soft_moe_vit_tiny_patch8_e8"):
        torch.manual_seed(0)
        via_timm = timm.create_model(name, num_classes=5, moe_layers="all")
        torch.manual_seed(0)
        via_mome = mome.create_model(name, num_classes=5, moe_layers="all")
        assert isinstance(via_timm, MoEVisionTransformer) and via_timm.num_classes == 5
        assert via_timm.mome_model_args == {"num_classes": 5, "moe_layers": "all"}
        x = torch.randn(2, *via_mome.pretrained_cfg.input_size)
        assert _same(via_timm, via_mome, x)
        config = timm.data.resolve_model_data_config(via_timm)
        assert config["input_size"] == tuple(via_mome.pretrained_cfg.input_size)


def test_timm_loads_a_mome_saved_folder_exactly(tmp_path):
    model = mome.create_model("soft_moe_vit_tiny_patch8_e8", num_classes=3)
    folder = mome.save_pretrained(model, tmp_path / "saved")
    x = torch.randn(2, *model.pretrained_cfg.input_size)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert _same(loaded, model, x) and loaded.num_classes == 3
    fresh = timm.create_model(f"local-dir:{folder}")  # timm's convention: the architecture, not the weights
    assert fresh.num_classes == 3 and not _same(fresh, model, x)
    overridden = timm.create_model(f"local-dir:{folder}", pretrained=True, drop_rate=0.5)  # kwargs override
    assert overridden.head_drop.p == 0.5 and _same(overridden, model, x)


def test_timm_passes_a_tag_to_mome_cards(tmp_path):
    model = mome.create_model("vmoe_tiny_patch8_e4", num_classes=4)
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_model

    save_model(model, str(path))
    loaded = timm.create_model(
        "vmoe_tiny_patch8_e4", pretrained=True, num_classes=4, pretrained_cfg_overlay={"file": str(path)}
    )
    assert _same(loaded, model, torch.randn(1, 3, 32, 32))


PUSH_THEN_TIMM = r"""
import sys, torch, timm, mome
model = mome.create_model("vmoe_tiny_patch8_e4", num_classes=3).eval()
mome.push_to_hub(model, "org/timm-tiny")
loaded = timm.create_model("hf-hub:org/timm-tiny", pretrained=True).eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    assert torch.equal(loaded(x), model(x)), "outputs differ"
assert type(loaded).__name__ == "MoEVisionTransformer" and loaded.num_classes == 3
print("ok", loaded.mome_model_name)
"""


def test_timm_create_model_hf_hub_loads_what_mome_pushed(local_hub, tmp_path):
    result = local_hub.run_python(PUSH_THEN_TIMM, tmp_path / "hf-home")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "vmoe_tiny_patch8_e4"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(local_hub.repo_files("org/timm-tiny"))
