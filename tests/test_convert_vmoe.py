"""vmoe checkpoints: the sharded msgpack reader and the V-MoE / Soft-MoE converter, checked against an
independent numpy forward pass computed from the Flax-layout arrays."""

import math

import msgpack
import numpy as np
import pytest
import torch

import mome
from mome.convert import CONVERTERS, load_converted, read_checkpoint
from mome.models import MoEVisionTransformer

D, HEADS, HEAD_DIM, HIDDEN, EXPERTS, SLOTS, PATCH, IMG, CLASSES = 32, 4, 8, 64, 4, 2, 8, 16, 10
TOKENS = (IMG // PATCH) ** 2


# ------------------------------------------------------------------------------------------ Flax-layout params
def flax_params(rng, *, soft=False, qk_norm=False, cls=True):
    """A 2-block ViT params tree with upstream names and orientations; block 1 is the MoE block."""

    def normal(*shape, std=0.3):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def layer_norm():
        return {"scale": 1 + normal(D, std=0.1), "bias": normal(D, std=0.1)}

    def block(moe):
        attention = {name: {"kernel": normal(D, HEADS, HEAD_DIM), "bias": normal(HEADS, HEAD_DIM)} for name in "qkv"}
        attention = {"query": attention["q"], "key": attention["k"], "value": attention["v"]}
        attention["out"] = {"kernel": normal(HEADS, HEAD_DIM, D), "bias": normal(D)}
        if qk_norm:
            attention["query_ln"] = {"scale": 1 + normal(HEAD_DIM, std=0.1)}
            attention["key_ln"] = {"scale": 1 + normal(HEAD_DIM, std=0.1)}
        out = {"LayerNorm_0": layer_norm(), "LayerNorm_1": layer_norm(), "SelfAttention": attention}
        if not moe:
            out["Mlp"] = {
                "Dense_0": {"kernel": normal(D, HIDDEN), "bias": normal(HIDDEN)},
                "Dense_1": {"kernel": normal(HIDDEN, D), "bias": normal(D)},
            }
            return out
        router = (
            {"mu": normal(D, EXPERTS, SLOTS), "scale": np.float32(1.7)}
            if soft
            else {"dense": {"kernel": normal(D, EXPERTS)}}
        )
        out["Moe"] = {
            "Router": router,
            "Mlp": {
                "Dense_0": {"kernel": normal(EXPERTS, D, HIDDEN), "bias": normal(EXPERTS, HIDDEN)},
                "Dense_1": {"kernel": normal(EXPERTS, HIDDEN, D), "bias": normal(EXPERTS, D)},
            },
        }
        return out

    params = {
        "embedding": {"kernel": normal(PATCH, PATCH, 3, D), "bias": normal(D)},
        "Encoder": {
            "posembed_input": {"pos_embedding": normal(1, TOKENS + int(cls), D)},
            "encoderblock_0": block(False),
            "encoderblock_1": block(True),
            "encoder_norm": layer_norm(),
        },
        "head": {"kernel": normal(D, CLASSES), "bias": normal(CLASSES)},
    }
    if cls:
        params["cls"] = normal(1, 1, D)
    return params


def flat(tree, prefix=""):
    out = {}
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


# ------------------------------------------------------------------------------------------ vmoe-format writer
# Follows vmoe/checkpoints/{serialization,partitioned}.py: Flax ndarray ext (1), Slice (5), SliceNd (6),
# ShapedArray (4), IndexInfo (8); index tree + data shards holding [subchunks, global SliceNd] per leaf id.
def _ndarray_ext(arr):
    arr = np.ascontiguousarray(arr)
    return msgpack.ExtType(1, msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True))


def _slice_nd_bytes(region):
    return msgpack.packb(tuple(msgpack.packb((a, b, None), use_bin_type=True) for a, b in region), use_bin_type=True)


def _index_info_ext(arr, regions, shards):
    shaped = msgpack.packb((arr.shape, arr.dtype.name, False, {}), use_bin_type=True)
    payload = (shaped, tuple(_slice_nd_bytes(r) for r in regions), tuple(shards))
    return msgpack.ExtType(8, msgpack.packb(payload, use_bin_type=True))


def _default(obj):
    if isinstance(obj, np.ndarray):
        return _ndarray_ext(obj)
    if isinstance(obj, np.generic):
        return msgpack.ExtType(3, _ndarray_ext(np.asarray(obj)).data)
    raise TypeError(type(obj))


def write_vmoe_sharded(prefix, params, num_shards=2):
    """Big leaves split in two chunks along axis 0 (in different shards), each chunk in two subchunks."""
    leaves = flat(params)
    data = [{"__msgpack_array_chunk_a87ca2__": True} for _ in range(num_shards)]
    index_leaves = {}
    for leaf_id, (name, arr) in enumerate(leaves.items()):
        if arr.ndim and arr.shape[0] > 1 and arr.size > 64:
            half = arr.shape[0] // 2
            regions = [
                [(0, half)] + [(0, s) for s in arr.shape[1:]],
                [(half, arr.shape[0])] + [(0, s) for s in arr.shape[1:]],
            ]
        else:
            regions = [[(0, s) for s in arr.shape]]
        shards = [(leaf_id + i) % num_shards for i in range(len(regions))]
        for region, shard in zip(regions, shards):
            chunk = arr[tuple(slice(a, b) for a, b in region)].reshape(-1)
            cut = max(1, chunk.size // 2)
            subchunks = [chunk[:cut], chunk[cut:]] if chunk.size > 1 else [chunk]
            slice_nd = msgpack.ExtType(6, _slice_nd_bytes(region))
            data[shard].setdefault(str(leaf_id), []).append([subchunks, slice_nd])
        index_leaves[name] = _index_info_ext(arr, regions, shards)
    tree = {}
    for name, info in index_leaves.items():
        node = tree
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = info
    index = {"shard_count": num_shards, "index": tree, "version": "20220622"}
    with open(f"{prefix}.index", "wb") as f:
        f.write(msgpack.packb(index, use_bin_type=True, strict_types=False))
    for shard, content in enumerate(data):
        with open(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}", "wb") as f:
            f.write(msgpack.packb(content, default=_default, use_bin_type=True))


def write_flax_msgpack(path, params):
    """``flax.serialization.to_bytes(params)``: one msgpack tree with ndarray ext leaves."""
    with open(path, "wb") as f:
        f.write(msgpack.packb(params, default=_default, use_bin_type=True, strict_types=True))


# ------------------------------------------------------------------------------------------ numpy reference
def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x, scale, bias=None, eps=1e-6):
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return x * scale + (0 if bias is None else bias)


def softmax(x, axis):
    x = np.exp(x - x.max(axis=axis, keepdims=True))
    return x / x.sum(axis=axis, keepdims=True)


def l2_normalize(x, axis):
    return x / np.sqrt((x**2).sum(axis=axis, keepdims=True) + 1e-6)


def np_block(x, p, *, top_k=2):
    """One encoder block of vmoe's ViT on ``x [B, N, D]`` from Flax-layout params (float64)."""
    att = p["SelfAttention"]
    y = layer_norm(x, p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"])
    q, k, v = (np.einsum("bnd,dhk->bnhk", y, att[n]["kernel"]) + att[n]["bias"] for n in ("query", "key", "value"))
    if "query_ln" in att:
        q, k = layer_norm(q, att["query_ln"]["scale"]), layer_norm(k, att["key_ln"]["scale"])
    weights = softmax(np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1]), axis=-1)
    o = np.einsum("bhqs,bshk->bqhk", weights, v)
    x = x + np.einsum("bqhk,hkd->bqd", o, att["out"]["kernel"]) + att["out"]["bias"]
    y = layer_norm(x, p["LayerNorm_1"]["scale"], p["LayerNorm_1"]["bias"])
    if "Mlp" in p:
        mlp = p["Mlp"]
        h = gelu_tanh(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
        return x + h @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
    experts, router = p["Moe"]["Mlp"], p["Moe"]["Router"]

    def expert(e, t):
        h = gelu_tanh(t @ experts["Dense_0"]["kernel"][e] + experts["Dense_0"]["bias"][e])
        return h @ experts["Dense_1"]["kernel"][e] + experts["Dense_1"]["bias"][e]

    if "mu" in router:  # Soft MoE: dispatch over tokens, combine over all E*P slots
        logits = np.einsum("bmd,dnp->bmnp", l2_normalize(y, -1), l2_normalize(router["mu"], 0) * router["scale"])
        dispatch = softmax(logits, axis=1)
        combine = softmax(logits.reshape(*logits.shape[:2], -1), axis=-1).reshape(logits.shape)
        slots = np.einsum("bmnp,bmd->bnpd", dispatch, y)
        outs = np.stack([expert(e, slots[:, e]) for e in range(slots.shape[1])], axis=1)  # [B, E, P, D]
        return x + np.einsum("bmnp,bnpd->bmd", combine, outs)
    gates = softmax(y @ router["dense"]["kernel"], axis=-1)  # [B, N, E]; V-MoE: no renormalisation
    out = np.zeros_like(y)
    top = np.argsort(-gates, axis=-1)[..., :top_k]
    for b, n in np.ndindex(*y.shape[:2]):
        for e in top[b, n]:
            out[b, n] += gates[b, n, e] * expert(e, y[b, n])
    return x + out


def np_forward(image, params, *, gap=False):
    """vmoe's VisionTransformerMoe on an NCHW image (the Flax model takes NHWC)."""
    img = image.transpose(0, 2, 3, 1).astype(np.float64)  # NHWC
    b, h, w, c = img.shape
    patches = img.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c)
    x = np.einsum("bgiwjc,ijcd->bgwd", patches, params["embedding"]["kernel"]) + params["embedding"]["bias"]
    x = x.reshape(b, -1, D)
    if "cls" in params:
        x = np.concatenate([np.broadcast_to(params["cls"], (b, 1, D)), x], axis=1)
    enc = params["Encoder"]
    x = x + enc["posembed_input"]["pos_embedding"]
    for i in range(2):
        x = np_block(x, enc[f"encoderblock_{i}"])
    x = layer_norm(x, enc["encoder_norm"]["scale"], enc["encoder_norm"]["bias"])
    x = x.mean(axis=1) if gap else x[:, 0]
    if "pre_logits" in params:  # vmoe's representation_size: Dense + tanh
        x = np.tanh(x @ params["pre_logits"]["kernel"] + params["pre_logits"]["bias"])
    return x @ params["head"]["kernel"] + params["head"]["bias"]


def as64(tree):
    return {k: as64(v) if isinstance(v, dict) else np.asarray(v, dtype=np.float64) for k, v in tree.items()}


SPARSE = dict(
    img_size=IMG,
    patch_size=PATCH,
    embed_dim=D,
    depth=2,
    num_heads=HEADS,
    mlp_ratio=HIDDEN / D,
    num_classes=CLASSES,
    num_experts=EXPERTS,
    top_k=2,
    moe_layers=[1],
    router="top_k",
    act_layer="gelu_tanh",
)


def sparse_model():
    return MoEVisionTransformer(**SPARSE).eval()


def soft_model(**kwargs):
    args = dict(
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=D,
        depth=2,
        num_heads=HEADS,
        mlp_ratio=HIDDEN / D,
        num_classes=CLASSES,
        num_experts=EXPERTS,
        moe_layers=[1],
        moe_type="soft",
        slots_per_expert=SLOTS,
        class_token=False,
        global_pool="avg",
        fc_norm=False,
        qk_norm=True,
        act_layer="gelu_tanh",
    )
    return MoEVisionTransformer(**{**args, **kwargs}).eval()


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("soft", [False, True], ids=["vmoe", "soft-moe-with-scalar"])
def test_sharded_reader_reassembles_every_leaf(tmp_path, soft):
    params = flax_params(np.random.default_rng(0), soft=soft)
    write_vmoe_sharded(tmp_path / "ckpt", params, num_shards=3)
    expected = flat(params)
    for path in (tmp_path / "ckpt", tmp_path / "ckpt.index", tmp_path / "ckpt.data-00001-of-00003"):
        state = read_checkpoint(path, "vmoe")
        assert list(state) == list(expected)
        for key, arr in expected.items():
            assert tuple(state[key].shape) == arr.shape, key
            np.testing.assert_array_equal(state[key].numpy(), arr, err_msg=key)
    assert "Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel" in state


def test_single_file_bfloat16_and_npz(tmp_path):
    weights = torch.randn(3, 5).to(torch.bfloat16)
    raw = weights.view(torch.int16).numpy().tobytes()  # bf16 bytes as jax writes them (dtype name "bfloat16")
    leaf = msgpack.ExtType(1, msgpack.packb(((3, 5), "bfloat16", raw), use_bin_type=True))
    with open(tmp_path / "bf16.msgpack", "wb") as f:
        f.write(msgpack.packb({"head": {"kernel": leaf}}, use_bin_type=True))
    state = read_checkpoint(tmp_path / "bf16.msgpack", "vmoe")
    assert state["head/kernel"].dtype == torch.bfloat16 and torch.equal(state["head/kernel"], weights)
    np.savez(tmp_path / "params.npz", **{"Encoder/encoder_norm/scale": np.ones(4, np.float32)})
    assert read_checkpoint(tmp_path / "params.npz", "vmoe")["Encoder/encoder_norm/scale"].shape == (4,)


def test_reader_refuses_incomplete_shards(tmp_path):
    write_vmoe_sharded(tmp_path / "ckpt", flax_params(np.random.default_rng(0)), num_shards=2)
    (tmp_path / "ckpt.data-00001-of-00002").unlink()
    with pytest.raises(mome.CorruptCheckpointError, match="shard ckpt.data-00001-of-00002, which is missing"):
        read_checkpoint(tmp_path / "ckpt", "vmoe")


def test_vmoe_model_matches_numpy_reference(tmp_path):
    params = flax_params(np.random.default_rng(1))
    write_vmoe_sharded(tmp_path / "vmoe", params)
    model = sparse_model()
    model.load_state_dict(load_converted(tmp_path / "vmoe", "vmoe", "vmoe", model), strict=True)
    p64 = as64(params)
    x = np.random.default_rng(2).standard_normal((2, TOKENS + 1, D))
    with torch.no_grad():
        for i in range(2):
            ours = model.blocks[i](torch.from_numpy(x).float()).double().numpy()
            np.testing.assert_allclose(ours, np_block(x, p64["Encoder"][f"encoderblock_{i}"]), atol=1e-5, rtol=0)
        image = np.random.default_rng(3).standard_normal((2, 3, IMG, IMG))
        logits = model(torch.from_numpy(image).float()).double().numpy()
    np.testing.assert_allclose(logits, np_forward(image, p64), atol=1e-4, rtol=0)


def test_soft_moe_tree_with_qk_norm_matches_numpy_reference(tmp_path):
    params = flax_params(np.random.default_rng(4), soft=True, qk_norm=True, cls=False)
    write_flax_msgpack(tmp_path / "soft.msgpack", params)
    model = soft_model()
    model.load_state_dict(load_converted(tmp_path / "soft.msgpack", "vmoe", "vmoe", model), strict=True)
    mu = params["Encoder"]["encoderblock_1"]["Moe"]["Router"]["mu"]
    torch.testing.assert_close(model.blocks[1].mlp.mu[:, 1 * SLOTS + 1], torch.from_numpy(mu[:, 1, 1]))
    assert torch.all(model.blocks[0].attn.q_norm.bias == 0)
    p64 = as64(params)
    x = np.random.default_rng(5).standard_normal((2, TOKENS, D))
    image = np.random.default_rng(6).standard_normal((2, 3, IMG, IMG))
    with torch.no_grad():
        ours = model.blocks[1](torch.from_numpy(x).float()).double().numpy()
        logits = model(torch.from_numpy(image).float()).double().numpy()
    np.testing.assert_allclose(ours, np_block(x, p64["Encoder"]["encoderblock_1"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, np_forward(image, p64, gap=True), atol=1e-4, rtol=0)


def test_soft_moe_into_timm_fc_norm_layout_is_refused():
    state = {
        k: torch.from_numpy(v)
        for k, v in flat(flax_params(np.random.default_rng(0), soft=True, qk_norm=True, cls=False)).items()
    }
    with pytest.raises(mome.CheckpointMismatchError, match="encoder_norm .* before pooling.*fc_norm=False"):
        CONVERTERS["vmoe"](state, soft_model(fc_norm=None))


def test_pre_logits_matches_numpy_reference(tmp_path):
    rng = np.random.default_rng(11)
    params = flax_params(rng)
    params["pre_logits"] = {"kernel": (rng.standard_normal((D, 24)) * 0.3).astype(np.float32)}
    params["pre_logits"]["bias"] = (rng.standard_normal(24) * 0.3).astype(np.float32)
    params["head"]["kernel"] = (rng.standard_normal((24, CLASSES)) * 0.3).astype(np.float32)
    write_vmoe_sharded(tmp_path / "vmoe", params)
    model = MoEVisionTransformer(**{**SPARSE, "representation_size": 24}).eval()
    model.load_state_dict(load_converted(tmp_path / "vmoe", "vmoe", "vmoe", model), strict=True)
    assert model.head_hidden_size == 24 and model.num_features == D
    image = np.random.default_rng(12).standard_normal((2, 3, IMG, IMG))
    with torch.no_grad():
        logits = model(torch.from_numpy(image).float()).double().numpy()
        pre = model.forward_head(model.forward_features(torch.from_numpy(image).float()), pre_logits=True)
    np.testing.assert_allclose(logits, np_forward(image, as64(params)), atol=1e-4, rtol=0)
    assert pre.shape == (2, 24) and pre.abs().max() < 1  # tanh
    with pytest.raises(mome.CheckpointMismatchError, match="representation_size=24"):
        load_converted(tmp_path / "vmoe", "vmoe", "vmoe", sparse_model())


def test_train_state_params_subtree_and_ignored_optimizer(tmp_path):
    params = flax_params(np.random.default_rng(7))
    tree = {"params": params, "opt_state": {"m": np.zeros(3, np.float32)}, "step": np.int64(10)}
    write_flax_msgpack(tmp_path / "state.msgpack", tree)
    model = sparse_model()
    with pytest.raises(mome.CheckpointMismatchError, match="opt_state/m"):
        load_converted(tmp_path / "state.msgpack", "vmoe", "vmoe", model)
    state = load_converted(tmp_path / "state.msgpack", "vmoe", "vmoe", model, ignore_prefixes=("opt_state/", "step"))
    torch.testing.assert_close(state["head.weight"], torch.from_numpy(params["head"]["kernel"]).t())


def tensors(params):
    return {k: torch.from_numpy(v) for k, v in flat(params).items()}


def test_missing_extra_and_misshaped_keys_are_named(tmp_path):
    model = sparse_model()
    state = tensors(flax_params(np.random.default_rng(8)))
    missing = dict(state)
    del missing["Encoder/encoderblock_1/Moe/Router/dense/kernel"]
    with pytest.raises(mome.CheckpointMismatchError, match="checkpoint lacks: Encoder/encoderblock_1/Moe/Router"):
        CONVERTERS["vmoe"](missing, model)
    extra = {**state, "Encoder/encoderblock_1/Moe/Router/extra": torch.zeros(D, D)}
    with pytest.raises(mome.CheckpointMismatchError, match="no counterpart in the model: Encoder/encoderblock_1/Moe"):
        CONVERTERS["vmoe"](extra, model)
    wrong = {**state, "Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel": torch.zeros(EXPERTS + 1, D, HIDDEN)}
    with pytest.raises(mome.CheckpointMismatchError, match=r"blocks\.1\.mlp\.experts\.w_in .*\(5, 64, 32\)"):
        CONVERTERS["vmoe"](wrong, model)
    # a dense block where the model expects an MoE: both sides are listed
    write_flax_msgpack(tmp_path / "dense.msgpack", flax_params(np.random.default_rng(9), soft=True))
    with pytest.raises(mome.CheckpointMismatchError, match=r"dense\.msgpack.*\n.*Moe/Router/mu"):
        load_converted(tmp_path / "dense.msgpack", "vmoe", "vmoe", model)


def test_position_embedding_is_resampled_to_a_larger_grid():
    state = tensors(flax_params(np.random.default_rng(10)))
    model = MoEVisionTransformer(
        img_size=2 * IMG, patch_size=PATCH, embed_dim=D, depth=2, num_heads=HEADS, mlp_ratio=HIDDEN / D,
        num_classes=CLASSES, num_experts=EXPERTS, top_k=2, moe_layers=[1], router="top_k",
    )  # fmt: skip
    converted = CONVERTERS["vmoe"](state, model)
    assert converted["pos_embed"].shape == (1, 4 * TOKENS + 1, D)
    torch.testing.assert_close(converted["pos_embed"][:, :1], state["Encoder/posembed_input/pos_embedding"][:, :1])
