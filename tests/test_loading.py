"""Memory-aware loading: ``create_model(..., low_cpu_mem_usage=True, device_map=...)`` (``mome/_loading.py``).

Each family's tiny model is saved with ``save_pretrained`` and loaded both ways; the memory-aware load must give the
same tensors (buffers that the checkpoint lacks included), the same ties and the same outputs, bit for bit, and must
read each parameter once into the tensor the model keeps. Bad checkpoints and device maps raise typed one-line errors
before anything is handed out. ``tools/bench_loading.py`` measures the peak memory of both loads.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mome
from mome import _loading
from mome._registry import model_module

ROOT = Path(__file__).resolve().parents[1]
#: each family's tiny model (test_every_family_has_a_tiny_model_here checks that none is missing); the upcycled
#: families are covered in tests/test_upcycle_models.py (test_upcycled_model_saves_and_reloads_exactly)
TINY = {
    "vmoe": "vmoe_tiny_patch8_e4",
    "soft_moe_vit": "soft_moe_vit_tiny_patch8_e8",
    "limoe": "limoe_tiny_patch8_e4",
    "vlmo": "vlmo_tiny_patch8_32",
    "vl_moe": "vl_moe_tiny_patch8_32",
    "moe_llava": "moe_llava_tiny_e4",
    "uni_moe": "uni_moe_tiny_e4",
}
HF_TINY = sorted(mome.list_models("*_tiny"))  # transformers' MoE VLMs (aria_tiny, llama4_tiny, ...)


def family_forward(name):
    """The outputs of a model of ``name`` on fixed inputs."""
    torch.manual_seed(1)
    if name.startswith(("moe_llava", "uni_moe")) or name in HF_TINY:
        ids = torch.randint(3, 90, (2, 10))
        return lambda m: m(input_ids=ids).logits
    images = torch.randn(2, 3, 32, 32)
    if name.startswith(("limoe", "vlmo", "vl_moe")):
        texts = mome.get_tokenizer(name)(["a photo of a 3", "a 7"])
        return lambda m: torch.cat([f.flatten() for f in m(images, texts)[:2]])
    return lambda m: m(images)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> the folder its seeded random tiny model was saved to."""
    root = tmp_path_factory.mktemp("saved")
    folders = {}
    for name in [*TINY.values(), *HF_TINY]:
        torch.manual_seed(0)
        folders[name] = mome.save_pretrained(mome.create_model(name).eval(), root / name)
    return folders


def test_every_family_has_a_tiny_model_here():
    ours = [name for name in mome.list_models() if mome.model_entrypoint(name).__module__.startswith("mome.")]
    families = {model_module(name).lstrip("_") for name in ours} - {"upcycle", "hf_moe_vlm"}  # not tests' models
    assert families == set(TINY)
    assert HF_TINY and all(model_module(name) == "hf_moe_vlm" for name in HF_TINY)


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())  # non-persistent buffers too
    assert list(ba) == list(bb) and all(torch.equal(ba[k], bb[k]) for k in ba)
    assert len(list(a.parameters())) == len(list(b.parameters()))  # ties kept: as many distinct parameters
    assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
    assert not any(t.is_meta for t in [*b.parameters(), *b.buffers()])


@pytest.mark.parametrize("name", [*TINY.values(), *HF_TINY])
def test_low_memory_load_equals_the_normal_load(saved, name):
    normal = mome.create_model(f"local-dir:{saved[name]}").eval()
    low = mome.create_model(f"local-dir:{saved[name]}", low_cpu_mem_usage=True).eval()
    assert_same_model(normal, low)
    assert low.mome_model_name == normal.mome_model_name and low.mome_model_args == normal.mome_model_args
    forward = family_forward(name)
    with torch.no_grad():
        # The parameters are bitwise equal (assert_same_model); the low-memory ones are read in place from the file,
        # at addresses of another alignment, where a vectorised kernel may sum in another order (last-bit changes,
        # seen in the tiny VLMo's blocks): the outputs agree to float rounding.
        torch.testing.assert_close(forward(normal), forward(low), rtol=1e-5, atol=1e-6)


def test_tied_weights_stay_one_parameter(saved):
    name = "ernie4_5_vl_moe_tiny"  # its LM head is its token embedding, stored once by save_pretrained
    low = mome.create_model(f"local-dir:{saved[name]}", device_map="cpu")
    head, embed = low.get_output_embeddings().weight, low.get_input_embeddings().weight
    assert head is embed and not head.is_meta


def test_each_parameter_is_read_once_into_the_tensor_the_model_keeps(saved, monkeypatch):
    """The empty model holds no parameter memory, and every parameter is the very tensor read from the file (no copy
    into a second buffer), read once."""
    built, reads = [], []
    build_empty = _loading.build_empty

    def spy_build(build):
        model = build_empty(build)
        built.append([p.is_meta for p in model.parameters()])
        return model

    real_open = _loading._open_safetensors

    def spy_open(files):
        with real_open(files) as (placeholders, read):

            def counted(key):
                tensor = read(key)
                reads.append((key, tensor.untyped_storage().data_ptr()))
                return tensor

            yield placeholders, counted

    monkeypatch.setattr(_loading, "build_empty", spy_build)
    monkeypatch.setattr("mome._factory.build_empty", spy_build)
    monkeypatch.setattr(_loading, "_open_safetensors", _loading.contextlib.contextmanager(spy_open))
    model = mome.create_model(f"local-dir:{saved['limoe_tiny_patch8_e4']}", low_cpu_mem_usage=True)
    assert built and all(built[0])  # built with every parameter on the meta device
    keys = [key for key, _ in reads]
    assert sorted(keys) == sorted(set(keys)) == sorted(model.state_dict())  # each tensor read once
    storages = {ptr for _, ptr in reads}
    assert all(p.untyped_storage().data_ptr() in storages for p in model.parameters())


def test_pretrained_card_and_checkpoint_path_routes(saved, tmp_path):
    name = "vmoe_tiny_patch8_e4"
    weights = saved[name] / "model.safetensors"
    reference = mome.create_model(f"local-dir:{saved[name]}").eval()
    card = mome.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, device_map="cpu")
    from_file = mome.create_model(name, checkpoint_path=weights, low_cpu_mem_usage=True)
    torch.save(reference.state_dict(), tmp_path / "w.pt")  # a torch file: memory-mapped, then set in place
    from_torch = mome.create_model(name, checkpoint_path=tmp_path / "w.pt", low_cpu_mem_usage=True)
    for model in (card, from_file, from_torch):
        assert_same_model(reference, model.eval())


def test_sharded_safetensors_folder_streams_every_shard(saved, tmp_path):
    name = "vmoe_tiny_patch8_e4"
    reference = mome.create_model(f"local-dir:{saved[name]}").eval()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    keys = list(state)
    (tmp_path / "shards").mkdir()
    save_file({k: state[k] for k in keys[::2]}, tmp_path / "shards" / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[1::2]}, tmp_path / "shards" / "model-00002-of-00002.safetensors")
    model = mome.create_model(name, checkpoint_path=tmp_path / "shards", checkpoint_format="mome", device_map="cpu")
    assert_same_model(reference, model.eval())


def test_a_converted_upstream_checkpoint_loads_into_the_empty_model(tmp_path):
    """A vmoe (Flax msgpack, sharded) checkpoint: converted in memory, then set into the empty model."""
    import numpy as np
    from test_convert_vmoe import SPARSE, flax_params, write_vmoe_sharded

    write_vmoe_sharded(tmp_path / "vmoe", flax_params(np.random.default_rng(0)))
    kwargs = dict(**SPARSE, checkpoint_path=tmp_path / "vmoe", checkpoint_format="vmoe")
    normal = mome.create_model("vmoe_tiny_patch8_e4", **kwargs).eval()
    low = mome.create_model("vmoe_tiny_patch8_e4", **kwargs, low_cpu_mem_usage=True).eval()
    assert_same_model(normal, low)


def test_a_conversion_that_keeps_freshly_initialised_tensors_is_refused(tmp_path):
    """A dense timm ViT upcycled on load: its routers come from the model's random init, which an empty model lacks."""
    timm = pytest.importorskip("timm")
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    dense = timm.create_model("vit_tiny_patch16_224", **args)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, tmp_path / "vit.safetensors")
    kwargs = dict(**args, num_experts=4, checkpoint_path=tmp_path / "vit.safetensors", checkpoint_format="timm")
    with pytest.raises(mome.UnsupportedModelError, match="lacks 1 tensor.*router.*without low_cpu_mem_usage") as info:
        mome.create_model("upcycled_timm_vit", **kwargs, low_cpu_mem_usage=True)
    one_line(info)


def one_line(info):
    text = str(info.value)
    assert "\n" not in text.strip(), text
    return text


def test_missing_and_unexpected_keys_are_a_readable_diff_before_anything_is_read(saved, tmp_path, monkeypatch):
    name = "vmoe_tiny_patch8_e4"
    state = mome.create_model(f"local-dir:{saved[name]}").state_dict()
    state = {k: v.contiguous() for k, v in state.items() if k != "head.weight"}
    state["head.extra"] = torch.zeros(2)
    save_file(state, tmp_path / "bad.safetensors")
    reads = []
    real_open = _loading._open_safetensors

    def spy_open(files):
        with real_open(files) as (placeholders, read):
            yield placeholders, lambda key: reads.append(key) or read(key)

    monkeypatch.setattr(_loading, "_open_safetensors", _loading.contextlib.contextmanager(spy_open))
    with pytest.raises(mome.CheckpointMismatchError) as info:
        mome.create_model(
            name, checkpoint_path=tmp_path / "bad.safetensors", device_map="cpu", checkpoint_format="mome"
        )
    first = str(info.value).splitlines()[0]
    assert "bad.safetensors" in first and "1 missing key(s), e.g. head.weight" in first
    assert "1 unexpected key(s), e.g. head.extra" in first
    assert reads == []  # checked from the header: no tensor was read


def test_non_finite_weights_are_refused_naming_the_tensor(saved, tmp_path):
    name = "vmoe_tiny_patch8_e4"
    state = {k: v.contiguous().clone() for k, v in mome.create_model(f"local-dir:{saved[name]}").state_dict().items()}
    state["head.weight"][0, 0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    path = tmp_path / "nan.safetensors"
    with pytest.raises(mome.NonFiniteWeightsError, match=r"head\.weight \(1 NaN"):
        mome.create_model(name, checkpoint_path=path, low_cpu_mem_usage=True)
    model = mome.create_model(name, checkpoint_path=path, low_cpu_mem_usage=True, allow_non_finite=True)
    assert torch.isnan(model.head.weight[0, 0])


def test_device_maps_that_do_not_fit_are_one_line_errors_naming_the_device_or_layer(saved, monkeypatch):
    folder = f"local-dir:{saved['vmoe_tiny_patch8_e4']}"
    cases = [
        (dict(device_map="cuda:7"), "device 'cuda:7' is not available here"),
        (dict(device_map="tpu"), "'tpu' is not a device"),
        (dict(device_map="disk"), "'disk' is not supported"),
        (dict(device_map={"blocks.0": "cpu"}), "places no device for .* layer\\(s\\), e.g. cls_token"),
        (dict(device_map={"": "cpu", "blocks.9": "cpu"}), "'blocks.9' is not a layer of"),
        (dict(device_map="cpu", max_memory={"cpu": "100KiB"}), "layer '.*' does not fit on 'cpu': max_memory holds"),
        (dict(device_map="auto", max_memory={"cpu": 200_000}), "device_map='auto': layer '.*' does not fit"),
        (dict(device_map="cpu", max_memory={"cpu": "lots"}), "max_memory\\['cpu'\\]: 'lots' is not a size"),
    ]
    for kwargs, message in cases:
        with pytest.raises(mome.DeviceMapError, match=message) as info:
            mome.create_model(folder, **kwargs)
        one_line(info)
    # a map over two devices is refused before any tensor is read (a pretend second device: no GPU here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(mome.DeviceMapError, match="several devices") as info:
        mome.create_model(folder, device_map={"": "cpu", "head": "cuda:0"})
    one_line(info)


def test_fitting_device_maps_load(saved):
    folder = f"local-dir:{saved['vmoe_tiny_patch8_e4']}"
    reference = mome.create_model(folder).eval()
    for device_map in ("auto", {"": "cpu"}, {"blocks": "cpu", "": "cpu"}, torch.device("cpu")):
        model = mome.create_model(folder, device_map=device_map, max_memory={"cpu": "1GiB"}).eval()
        assert_same_model(reference, model)


def test_options_without_weights_or_for_quantized_folders_are_refused(tmp_path):
    with pytest.raises(mome.UnsupportedOptionError, match="low_cpu_mem_usage=True: no weights are loaded"):
        mome.create_model("vmoe_tiny_patch8_e4", low_cpu_mem_usage=True)
    with pytest.raises(mome.UnsupportedOptionError, match="max_memory=.*none was given"):
        mome.create_model("vmoe_tiny_patch8_e4", max_memory={"cpu": "1GiB"})
    pytest.importorskip("torchao")
    model = mome.quantize(mome.create_model("vmoe_tiny_patch8_e4").eval(), "int8")
    folder = mome.save_pretrained(model, tmp_path / "q")
    with pytest.raises(mome.UnsupportedOptionError, match="holds a quantized model"):
        mome.create_model(f"local-dir:{folder}", device_map="cpu")


@pytest.mark.slow  # three fresh Python processes (save, two loads): about 35 s on 2 shared cores
def test_bench_loading_tool_runs_on_a_tiny_model(capsys):
    """``python tools/bench_loading.py --model vmoe_tiny_patch8_e4``: both loads measured in child processes."""
    spec = importlib.util.spec_from_file_location("bench_loading", ROOT / "tools" / "bench_loading.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--model", "vmoe_tiny_patch8_e4"])
    assert [row["mode"] for row in rows] == ["normal", "low_cpu_mem_usage"]
    weights = sum(t.numel() * t.element_size() for t in mome.create_model("vmoe_tiny_patch8_e4").state_dict().values())
    assert all(row["weights"] == weights and row["peak"] >= row["before"] > 0 for row in rows)
    assert "| vmoe_tiny_patch8_e4 | low_cpu_mem_usage |" in capsys.readouterr().out
