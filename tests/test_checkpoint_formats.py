"""Loading a checkpoint you already have: ``create_model(arch, checkpoint_path=FILE, checkpoint_format=F)``
with the format told from the file when omitted, converter options, typed one-line errors for the wrong
format, and ``python -m mome.zoo convert --file``."""

import pickle
import re
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import mome
from mome import CheckpointFormatError, CheckpointMismatchError, UnsafeCheckpointError
from mome._checkpoint import file_kind, read_state_dict
from mome._formats import detect_format
from mome.convert import OPEN_CLIP_NO_COUNTERPART
from mome.zoo import main as zoo_main

VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
# dropless, renormalised top-2 over copies of one FFN computes the dense function
MOE = dict(num_experts=4, top_k=2, moe_layers="every_2", router="top_k", act_layer="gelu")
MOE["moe_kwargs"] = {"renormalize": True, "capacity_factor": None}


def dense_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).eval()


def moe_vit_kwargs():
    torch.manual_seed(0)  # the routers are not in a dense checkpoint: the same seed, the same routers
    return {**VIT, **MOE}


def tiny_clip():
    from open_clip.model import CLIP

    vision = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16)
    text = dict(context_length=16, vocab_size=100, width=64, heads=4, layers=2)
    return CLIP(32, vision_cfg=vision, text_cfg=text).eval()


LIMOE = dict(img_size=32, patch_size=8, width=64, depth=2, num_heads=4, embed_dim=32, vocab_size=100)
LIMOE.update(context_length=16, num_experts=4, moe_layers=[1], act_layer="gelu")


@pytest.fixture
def timm_file(tmp_path):
    dense = dense_vit()
    path = tmp_path / "vit.safetensors"
    save_file(dense.state_dict(), path)
    return dense, path


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------ file kinds


def test_file_kind_reads_bytes_not_names(tmp_path):
    tensors = {"a": torch.ones(2)}
    save_file(tensors, tmp_path / "weights.bin")  # safetensors under another name
    torch.save(tensors, tmp_path / "weights.safetensors")  # a torch zip under a safetensors name
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "ckpt.index").write_bytes(msgpack.packb({"shard_count": 1, "index": {}}))
    np.savez(tmp_path / "params.npz", a=np.ones(2))
    (tmp_path / "junk").write_bytes(b"\x00hello, world")
    kinds = {p.name: file_kind(p) for p in tmp_path.iterdir()}
    assert kinds == {
        "weights.bin": "safetensors",
        "weights.safetensors": "torch",
        "legacy.pt": "torch",
        "ckpt.index": "msgpack",
        "params.npz": "npz",
        "junk": "unknown",
    }
    assert file_kind(tmp_path) == "folder"
    for name in ("weights.bin", "weights.safetensors", "legacy.pt"):
        assert torch.equal(read_state_dict(tmp_path / name)["a"], torch.ones(2))


def test_detect_format_from_key_names(tmp_path):
    def write(name, keys):
        save_file({k: torch.zeros(1) for k in keys}, tmp_path / name)
        return tmp_path / name

    assert detect_format(write("timm.safetensors", ["patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"])) == "timm"
    clip = write("clip.safetensors", ["visual.conv1.weight", "token_embedding.weight", "logit_scale"])
    assert detect_format(clip) == "open_clip"
    vlmo = write("vlmo.safetensors", ["transformer.blocks.0.mlp_imag.fc1.weight", "text_embeddings.LayerNorm.weight"])
    assert detect_format(vlmo) == "unilm_vlmo"
    assert detect_format(write("llava.safetensors", ["model.layers.0.mlp.fc1.weight", "lm_head.weight"])) == "moe_llava"
    qwen = write("qwen.safetensors", ["transformer.h.0.attn.c_attn.weight", "lm_head.weight"])
    assert detect_format(qwen) == "moe_llava"
    # stacked experts are mome's own names, not a dense timm file
    with pytest.raises(CheckpointFormatError, match="cannot tell"):
        detect_format(write("moe.safetensors", ["patch_embed.proj.weight", "blocks.1.mlp.experts.w_in"]))
    assert detect_format(write("own.safetensors", ["x.weight"]), model_keys=["x.weight"]) == "mome"


def test_detect_format_vmoe_and_folders(tmp_path):
    (tmp_path / "ckpt.index").write_bytes(msgpack.packb({"shard_count": 1, "index": {}}))
    assert detect_format(tmp_path / "ckpt.index") == "vmoe"
    assert detect_format(tmp_path) == "vmoe"  # a folder with a vmoe .index


def test_msgpack_maps_of_every_size_are_msgpack(tmp_path):
    # fixmap (<16 keys), map16 (<65536 keys: vmoe's data shards) and map32 headers
    for size in (3, 40, 70_000):
        path = tmp_path / f"map{size}"
        path.write_bytes(msgpack.packb({f"k{i}": i for i in range(size)}))
        assert file_kind(path) == "msgpack", size
    (tmp_path / "ints").write_bytes(msgpack.packb({1: 2}))  # a map keyed by integers is no Flax tree
    assert file_kind(tmp_path / "ints") == "unknown"


def test_every_path_to_a_sharded_vmoe_checkpoint_is_told_vmoe():
    """vmoe's own writer (tests/data/upstream/vmoe_every2): an index, two map16 data shards, and their prefix."""
    from fidelity import fixture_dir

    folder = fixture_dir("vmoe_every2")
    shards = sorted(folder.glob("ckpt.data-*"))
    assert len(shards) == 2
    for shard in shards:
        assert file_kind(shard) == "msgpack"
    for path in (folder / "ckpt", folder / "ckpt.index", *shards, folder):
        assert detect_format(path) == "vmoe", path
    kwargs = dict(img_size=16, patch_size=4, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=10)
    kwargs |= dict(num_experts=4, depth=4, moe_layers="every_2")
    from_prefix = mome.create_model("vmoe_b16_e8", checkpoint_path=folder / "ckpt", **kwargs)
    from_shard = mome.create_model("vmoe_b16_e8", checkpoint_path=shards[1], **kwargs)
    _assert_same_state(from_prefix.state_dict(), from_shard.state_dict())


def test_unknown_bytes_name_what_was_tried(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00hello, world")
    with pytest.raises(CheckpointFormatError) as info:
        detect_format(tmp_path / "junk.pt")
    message = str(info.value)
    assert "\n" not in message and "bytes of no known checkpoint format" in message
    for name in ("timm", "open_clip", "unilm_vlmo", "moe_llava", "vmoe"):
        assert name in message


# ------------------------------------------------------------------------------------ the public route


def test_an_upstream_file_loads_with_its_format_told_from_the_file(timm_file):
    dense, path = timm_file
    told = mome.create_model("vmoe_s32_e8", checkpoint_path=path, **moe_vit_kwargs()).eval()
    named = mome.create_model("vmoe_s32_e8", checkpoint_path=path, checkpoint_format="timm", **moe_vit_kwargs())
    _assert_same_state(_state(told), _state(named))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # dropless, renormalised top-2 over copies of one FFN: the dense function
        assert (told(x) - dense(x)).abs().max() < 1e-5


def test_a_mome_file_still_loads_as_itself(tmp_path):
    model = mome.create_model("vmoe_s32_e8", **moe_vit_kwargs())
    save_file(model.state_dict(), tmp_path / "own.safetensors")
    again = mome.create_model("vmoe_s32_e8", checkpoint_path=tmp_path / "own.safetensors", **moe_vit_kwargs())
    _assert_same_state(_state(model), _state(again))
    folder = mome.save_pretrained(model, tmp_path / "saved")
    from_folder = mome.create_model("vmoe_s32_e8", checkpoint_path=folder, checkpoint_format="mome", **moe_vit_kwargs())
    _assert_same_state(_state(model), _state(from_folder))


def test_converter_options_reach_the_converter(tmp_path):
    clip = tiny_clip()
    save_file(clip.state_dict(), tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointMismatchError, match="visual.class_embedding"):
        mome.create_model("limoe_b16_e8", checkpoint_path=tmp_path / "clip.safetensors", **LIMOE)
    options = {"ignore_prefixes": list(OPEN_CLIP_NO_COUNTERPART)}
    model = mome.create_model(
        "limoe_b16_e8", checkpoint_path=tmp_path / "clip.safetensors", converter_options=options, **LIMOE
    )
    torch.testing.assert_close(model.logit_scale, clip.logit_scale, rtol=0, atol=0)


def test_wrong_format_named_gets_a_hint_and_loads_nothing(timm_file):
    _, path = timm_file
    model = mome.create_model("limoe_b16_e8", **LIMOE)
    before = _state(model)
    with pytest.raises(CheckpointMismatchError, match="looks like the 'timm' format, not 'open_clip'"):
        mome.load_checkpoint_file(model, path, "open_clip")
    _assert_same_state(before, _state(model))


def test_msgpack_read_as_a_pickle_is_a_format_error_not_unsafe(tmp_path):
    index = tmp_path / "ckpt.index"
    index.write_bytes(msgpack.packb({"shard_count": 1, "index": {}}))
    with pytest.raises(CheckpointFormatError) as info:
        mome.create_model("vmoe_s32_e8", checkpoint_path=index, checkpoint_format="unilm_vlmo", **moe_vit_kwargs())
    message = str(info.value)
    assert "unilm_vlmo" in message and "msgpack" in message and "checkpoint_format='vmoe'" in message
    assert "weights_only=False" not in message and "\n" not in message


def test_a_pickle_that_runs_code_is_refused_without_unsafe_advice(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Boom()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError) as info:
        mome.create_model("vmoe_s32_e8", checkpoint_path=path, checkpoint_format="timm", **moe_vit_kwargs())
    assert "weights_only=False" not in str(info.value)


def test_a_mome_file_of_another_shape_names_the_keys(tmp_path):
    other = mome.create_model("vmoe_s32_e8", **{**moe_vit_kwargs(), "depth": 2})
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    model = mome.create_model("vmoe_s32_e8", **moe_vit_kwargs())
    with pytest.raises(CheckpointMismatchError, match="missing key") as info:
        mome.load_checkpoint_file(model, tmp_path / "other.safetensors")
    assert "blocks.3" in str(info.value) and "tried" in str(info.value)


def test_unknown_format_name_and_stray_options_are_refused(timm_file):
    _, path = timm_file
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint_format 'flax'"):
        mome.create_model("vmoe_s32_e8", checkpoint_path=path, checkpoint_format="flax", **moe_vit_kwargs())
    with pytest.raises(ValueError, match="apply to a checkpoint_path"):
        mome.create_model("vmoe_s32_e8", checkpoint_format="timm", **moe_vit_kwargs())


# ------------------------------------------------------------------------------------ the card route


def test_a_card_takes_converter_options(tmp_path):
    clip = tiny_clip()
    save_file(clip.state_dict(), tmp_path / "clip.safetensors")
    overlay = dict(
        file=str(tmp_path / "clip.safetensors"),
        source_format="open_clip",
        converter="open_clip",
        converter_options={"ignore_prefixes": list(OPEN_CLIP_NO_COUNTERPART)},
    )
    model = mome.create_model("limoe_b16_e8", pretrained=True, pretrained_cfg_overlay=overlay, **LIMOE)
    torch.testing.assert_close(model.logit_scale, clip.logit_scale, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ command line


def test_zoo_convert_a_local_upstream_file(timm_file, tmp_path, capsys):
    dense, path = timm_file
    sets = [f"--set={k}={v}" for k, v in VIT.items()]
    sets += ["--set=num_experts=4", "--set=top_k=2", "--set=moe_layers=every_2", "--set=router=top_k"]
    sets += ["--set=act_layer=gelu", "--set=moe_kwargs={renormalize: true, capacity_factor: null}"]
    out = tmp_path / "converted"
    argv = ["convert", "--file", str(path), "--format", "timm", "--arch", "vmoe_s32_e8", *sets, "--out", str(out)]
    assert zoo_main(argv) == 0
    model = mome.create_model(f"local-dir:{out}").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() < 1e-5
    # the wrong format: one line on stderr, nothing written
    bad = tmp_path / "bad"
    argv = ["convert", "--file", str(path), "--format", "open_clip", "--arch", "limoe_b16_e8", "--out", str(bad)]
    assert zoo_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mome.zoo convert: error: CheckpointMismatchError") and "\n" not in err
    assert not bad.exists()


def test_zoo_convert_options_and_usage_errors(tmp_path, capsys):
    clip = tiny_clip()
    save_file(clip.state_dict(), tmp_path / "clip.safetensors")
    sets = [f"--set={k}={v}" for k, v in LIMOE.items()]
    out = tmp_path / "limoe"
    argv = ["convert", "--file", str(tmp_path / "clip.safetensors"), "--arch", "limoe_b16_e8", *sets]
    argv += ["--option=ignore_prefixes=[visual.class_embedding, visual.ln_pre.]", "--out", str(out)]
    assert zoo_main(argv) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file()
    assert zoo_main(["convert", "--out", str(tmp_path / "x")]) == 2
    assert "convert must be given a card NAME, or --file FILE with --arch ARCH" in capsys.readouterr().err
    assert zoo_main(["convert", "--file", "f", "--arch", "limoe_b16_e8", "--set", "oops", "--out", "x"]) == 2
    assert "--set must be NAME=VALUE (a YAML value), got 'oops'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the README's lines


def _readme_section() -> tuple[str, list[str]]:
    """The python block and the bash lines of README.md's "an upstream checkpoint you already have"."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("An upstream checkpoint you already have", 1)[1].split("How close each card", 1)[0]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return python, [line for line in bash.splitlines() if line.strip()]


def test_the_readme_lines_load_files_the_upstream_code_wrote(tmp_path, monkeypatch):
    """README.md's lines, run as written on files named as there (vmoe's sharded checkpoint and unilm's
    Lightning checkpoint, from tests/data/upstream), with only the tiny fixtures' sizes added; each model
    has the weights of the routes tests/test_fidelity_{vmoe,vlmo}.py compare with the upstream outputs."""
    from fidelity import fixture_dir
    from test_fidelity_vlmo import _by_path as vlmo_by_path
    from test_fidelity_vlmo import _tiny as vlmo_sizes
    from test_fidelity_vmoe import TINY as VMOE_SIZES
    from test_fidelity_vmoe import _vmoe_by_path

    shutil.copytree(fixture_dir("vmoe_every2"), tmp_path / "vmoe_b16")
    shutil.copy(fixture_dir("vlmo_relpos_vl4m") / "checkpoint.pt", tmp_path / "vlmo_base_patch16_224.pt")
    monkeypatch.chdir(tmp_path)
    sizes = {"vmoe_b16_e8": dict(VMOE_SIZES, depth=4), "vlmo_base_patch16_224": vlmo_sizes("vlmo_relpos_vl4m")}
    expected = {
        "vmoe_b16_e8": _vmoe_by_path("vmoe_every2", 1.05, "float32").state_dict(),
        "vlmo_base_patch16_224": vlmo_by_path("vlmo_relpos_vl4m").state_dict(),
    }

    python, bash = _readme_section()
    built = []

    def create_model(name, **kwargs):
        built.append(name.split(".")[0])
        model = mome.create_model(name, **kwargs, **sizes[built[-1]])
        _assert_same_state(model.state_dict(), expected[built[-1]])
        return model

    exec(python, {"mome": SimpleNamespace(create_model=create_model)})
    assert built == ["vmoe_b16_e8", "vlmo_base_patch16_224"]

    for line in bash:
        words = shlex.split(line)
        assert words[:3] == ["python", "-m", "mome.zoo"], line
        arch = (words[4] if not words[4].startswith("--") else words[words.index("--arch") + 1]).split(".")[0]
        sets = [f"--set={key}={value}" for key, value in sizes[arch].items()]
        assert zoo_main([*words[3:], *sets]) == 0, line
        out = Path(words[words.index("--out") + 1])
        _assert_same_state(mome.create_model(f"local-dir:{out}").state_dict(), expected[arch])
