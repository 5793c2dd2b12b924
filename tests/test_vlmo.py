"""VLMo: sizes against upstream, the three paths, modality routing, shared relative position bias, configs."""

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import mome
import mome.models.vlmo  # noqa: F401  (registers the VLMo variants)
from mome.models.vlmo import (
    VLMo,
    fusion_relative_position_index,
    image_relative_position_index,
    text_relative_position_index,
)

CONF_MODEL = Path(mome.conf_dir()) / "model"
VLMO_CONFIGS = sorted(p.name for p in CONF_MODEL.glob("vlmo_*.yaml"))
TINY = "vlmo_tiny_patch8_32"
HEADS = ("pooler", "itm_score", "mlm_score", "itc_vl_image_proj", "itc_vl_text_proj", "logit_vl_scale")
ITC = ("itc_image_proj", "itc_text_proj", "logit_scale")


def tiny(**kwargs) -> VLMo:
    return mome.create_model(TINY, **kwargs)


def inputs(batch=2, text_len=10, vocab=1000):
    return torch.randn(batch, 3, 32, 32), torch.randint(1, vocab, (batch, text_len))


def count(model, prefixes=None, exclude=()):
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if (prefixes is None or n.split(".")[0] in prefixes) and n.split(".")[0] not in exclude
    )


def upstream_backbone_count(dim, depth, heads, vl_start, max_text_len=40, rel_pos=True, layer_scale=True):
    """Parameters of upstream's VLMo backbone (MultiWayTransformer, text embeddings, token types, bias table)."""
    hidden, patches, window = 4 * dim, 14 * 14, 14
    mlp = dim * hidden + hidden + hidden * dim + dim
    block = 2 * dim + (3 * dim * dim + 2 * dim + dim * dim + dim) + 2 * (mlp + 2 * dim)  # norm1, attn, 2 experts
    block += 2 * dim if layer_scale else 0
    blocks = depth * block + (depth - vl_start) * (mlp + 2 * dim)
    vision = dim * 3 * 16 * 16 + dim + dim + (0 if rel_pos else (patches + 1) * dim) + 2 * dim  # patch, cls, pos, norm
    text = 30522 * dim + max_text_len * dim + 2 * dim + 2 * dim + 2 * dim  # words, positions, types, LN, token types
    table = ((2 * window - 1) ** 2 + 3 + 2 * 196 + 2) * heads * depth if rel_pos else 0
    return blocks + vision + text + table


# ------------------------------------------------------------------------------------------- sizes
def test_variants_are_registered():
    assert mome.list_models("vlmo_*") == [
        "vlmo_base_patch16_224",
        "vlmo_base_plus_patch16_224",
        "vlmo_large_patch16_224",
        "vlmo_tiny_patch8_32",
    ]


@pytest.mark.parametrize(
    "name, readme, dims",
    [
        ("vlmo_base_patch16_224", 175e6, dict(dim=768, depth=12, heads=12, vl_start=10)),
        ("vlmo_base_plus_patch16_224", 167e6, dict(dim=544, depth=24, heads=16, vl_start=21, rel_pos=False)),
        ("vlmo_large_patch16_224", 562e6, dict(dim=1024, depth=24, heads=16, vl_start=21)),
    ],
)
def test_parameter_counts_match_upstream(name, readme, dims):
    with torch.device("meta"):
        model = mome.create_model(name)
    backbone = count(model, exclude=HEADS + ITC)
    with_itc = count(model, exclude=HEADS)
    print(f"{name}: backbone {backbone:,}, backbone + ITC heads {with_itc:,}, all {count(model):,}")
    layer_scale = dims.get("rel_pos", True)  # base_plus has neither
    assert backbone == upstream_backbone_count(**dims, layer_scale=layer_scale)
    assert abs(with_itc - readme) / readme < 0.03
    assert abs(backbone - readme) / readme < 0.01
    vl_blocks = [i for i, block in enumerate(model.blocks) if block.has_vl_expert]
    assert vl_blocks == list(range(dims["vl_start"], dims["depth"]))
    assert model.pretrained_cfg.input_size == (3, 224, 224) and model.pretrained_cfg.context_length == 40
    assert model.pretrained_cfg.mean == (0.5, 0.5, 0.5) and model.pretrained_cfg.tokenizer == "bert-base-uncased"


def test_upstream_layout_of_the_base_model():
    with torch.device("meta"):
        base = mome.create_model("vlmo_base_patch16_224")
        plus = mome.create_model("vlmo_base_plus_patch16_224")
    assert base.relative_position_bias_table.shape == (1126, 144)  # issue #1256 dump of the base checkpoint
    assert base.relative_position_index.shape == (197, 197)
    assert base.text_relative_position_index.shape == (40, 40)
    assert base.text_imag_relative_position_index.shape == (237, 237)
    block = base.blocks[4]
    assert block.attn.qkv.bias is None and block.attn.qkv.weight.shape == (2304, 768)
    assert block.attn.q_bias.shape == block.attn.v_bias.shape == (768,)
    assert block.mlp.moe.experts.w_in.shape == (2, 3072, 768) and block.mlp.norm.weight.shape == (2, 768)
    assert block.gamma_1.shape == (768,) and block.mlp.vl_ffn is None and base.blocks[10].mlp.vl_ffn is not None
    assert base.pos_embed is None and plus.relative_position_bias_table is None
    assert plus.pos_embed.shape == (1, 197, 544) and plus.blocks[0].gamma_1 is None
    assert base.text_embeddings.word_embeddings.weight.shape == (30522, 768)
    assert base.token_type_embeddings.weight.shape == (2, 768)


# ------------------------------------------------------------------------------------------- init
def _relative_spread(features: torch.Tensor) -> float:
    """``mean_i |f_i - mean(f)| / mean_i |f_i|``: how much the features of a batch differ, relative to their size."""
    return ((features - features.mean(0)).norm(dim=-1).mean() / features.norm(dim=-1).mean()).item()


def _one_digit_per_class() -> torch.Tensor:
    """The first test digit of each class, ``[10, 3, 32, 32]`` in [-1, 1] (8x8 upsampled, grey to RGB)."""
    from mome.data.digits import digits_splits

    images, labels = digits_splits(0)["test"]
    first = [int((labels == c).nonzero()[0][0]) for c in range(10)]
    x = torch.from_numpy(images[first]).float().div(127.5).sub(1.0)  # [10, 8, 8]
    return torch.nn.functional.interpolate(x[:, None], size=32, mode="nearest").expand(-1, 3, -1, -1)


@pytest.mark.parametrize("name", [TINY, "vl_moe_tiny_patch8_32"])
def test_tiny_init_makes_the_dual_encoder_features_depend_on_the_input(name):
    """At init the ITC features of ten digits and of the ten captions "the digit {class}." must differ: with
    upstream's init at width 64 (std 0.02, layer scale 0.1) the text features spread 0.05% of their norm and
    the image features 1-2%, and ITC collapses them (docstring of ``vlmo_tiny_patch8_32``); the tiny init gives
    4-8% and 17-24% (seeds 0-2)."""
    from mome.data.digits import DIGIT_CLASSNAMES

    images = _one_digit_per_class()
    captions = mome.get_tokenizer(name)([f"the digit {c}." for c in DIGIT_CLASSNAMES])
    spreads = {}
    for label, kwargs in (("tiny", {}), ("upstream", dict(init_std=0.02, layer_scale_init_values=0.1))):
        torch.manual_seed(0)
        model = mome.create_model(name, **kwargs).eval()
        with torch.no_grad():
            image_features, text_features = model.encode_image(images), model.encode_text(captions)
        spreads[label] = (_relative_spread(image_features), _relative_spread(text_features))
    assert spreads["tiny"][0] > 0.1 and spreads["tiny"][1] > 0.02, spreads
    # the property fails with upstream's values, which the upstream-sized variants keep
    assert spreads["upstream"][0] < 0.05 and spreads["upstream"][1] < 0.005, spreads


def test_tiny_init_std_scales_every_initialised_weight():
    """``init_std`` is the std of every linear, expert and embedding init (upstream's 0.02 by default; the
    tiny variant's ``0.02 * sqrt(768 / 64)``); layer scale starts at ``layer_scale_init_values``."""
    with torch.device("meta"):
        base = mome.create_model("vlmo_base_patch16_224")
    assert base.init_std == 0.02
    torch.manual_seed(0)
    model = tiny()
    assert model.init_std == pytest.approx(0.02 * math.sqrt(12))
    for weight in (model.blocks[0].attn.qkv.weight, model.blocks[0].mlp.moe.experts.w_in, model.itc_text_proj.weight):
        # a truncated normal at +-2 (absolute) barely truncates a std of 0.069: its std is within 5%
        assert weight.std().item() == pytest.approx(model.init_std, rel=0.05)
    assert model.text_embeddings.word_embeddings.weight.std().item() == pytest.approx(model.init_std, rel=0.05)
    assert torch.equal(model.blocks[0].gamma_1, torch.ones(64)) and torch.equal(model.blocks[3].gamma_2, torch.ones(64))
    upstream = tiny(init_std=0.02, layer_scale_init_values=0.1)
    assert upstream.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.allclose(upstream.blocks[0].gamma_1, torch.full((64,), 0.1))
    with pytest.raises(ValueError, match="init_std"):
        tiny(init_std=0.0)


# ------------------------------------------------------------------------------------------- paths
def test_tiny_paths_forward_backward_and_expert_gradients():
    model = tiny()
    image, text = inputs()
    experts = [block.mlp.moe.experts for block in model.blocks]

    model.encode_image(image).sum().backward()
    for block, exp in zip(model.blocks, experts):
        assert exp.w_in.grad[0].abs().sum() > 0 and exp.w_in.grad[1].abs().sum() == 0  # V-FFN only
        assert block.mlp.vl_ffn is None or block.mlp.vl_ffn.fc1.weight.grad is None
    assert model.patch_embed.proj.weight.grad is not None and model.text_embeddings.word_embeddings.weight.grad is None

    model.zero_grad(set_to_none=True)
    model.encode_text(text).sum().backward()
    for exp in experts:
        assert exp.w_in.grad[1].abs().sum() > 0 and exp.w_in.grad[0].abs().sum() == 0  # L-FFN only
    assert model.patch_embed.proj.weight.grad is None and model.text_embeddings.word_embeddings.weight.grad is not None
    # base-style text positions come from the relative bias only (upstream's "rel_pos" BERT config)
    assert model.text_embeddings.position_embeddings.weight.grad is None
    assert model.relative_position_bias_table.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    tokens, pooled = model.forward_fusion(image, text)
    assert tokens.shape == (2, 10 + 17, 64) and pooled.shape == (2, 64)
    (tokens.sum() + pooled.sum()).backward()
    for i, (block, exp) in enumerate(zip(model.blocks, experts)):
        if i < model.vlffn_start_layer_index:
            assert exp.w_in.grad[0].abs().sum() > 0 and exp.w_in.grad[1].abs().sum() > 0
        else:
            assert exp.w_in.grad is None and block.mlp.vl_ffn.fc1.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_open_clip_contract():
    model = tiny().eval()
    image, text = inputs()
    image_features, text_features, scale = model(image, text)
    assert image_features.shape == text_features.shape == (2, 64)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(image_features, model.encode_image(image, normalize=True))
    torch.testing.assert_close(text_features, model.encode_text(text, normalize=True))
    assert not torch.allclose(model.encode_image(image).norm(dim=-1), torch.ones(2))
    assert math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-5) and isinstance(model.logit_scale, torch.nn.Parameter)
    assert model(text=text)[0] is None and model(image)[1] is None
    out = model(image, text, output_dict=True)
    torch.testing.assert_close(out["image_features"], image_features)
    vl = model.encode_image(image, normalize=True, vlffn=True)  # VLMo's second ITC pair (VL-FFN on top)
    assert vl.shape == (2, 64) and not torch.allclose(vl, image_features)


def test_itm_and_mlm_heads():
    model = tiny()
    image, text = inputs(text_len=12)
    assert model.itm_logits(image, text).shape == (2, 2)
    assert model.itm_score.out_features == 2
    assert model.mlm_logits(text, image).shape == (2, 12, 1000)
    assert model.mlm_logits(text).shape == (2, 12, 1000)  # text-only MLM (language pre-training stage)
    assert model.mlm_score.decoder.weight is not model.text_embeddings.word_embeddings.weight  # untied, as upstream
    tied = tiny(tie_mlm_decoder=True)
    assert tied.mlm_score.decoder.weight is tied.text_embeddings.word_embeddings.weight


def test_text_padding_is_masked():
    model = tiny().eval()
    image, text = inputs(text_len=8)
    mask = torch.ones_like(text, dtype=torch.bool)
    mask[:, 5:] = False
    other = text.clone()
    other[:, 5:] = torch.randint(1, 1000, (2, 3))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(text, text_mask=mask), model.encode_text(other, text_mask=mask))
        torch.testing.assert_close(
            model.forward_fusion(image, text, mask)[1], model.forward_fusion(image, other, mask)[1]
        )
        padded = text.clone()
        padded[:, 5:] = 0  # pad id: masked without an explicit text_mask
        torch.testing.assert_close(model.encode_text(padded), model.encode_text(text, text_mask=mask))


def test_eager_attention_matches_fused_and_checkpointing_matches():
    model = tiny().eval()
    image, text = inputs()
    text[:, 7:] = 0
    with torch.no_grad():
        for p in (model.relative_position_bias_table, *(b.mlp.vl_ffn.fc1.bias for b in model.blocks[2:])):
            p.normal_()
        fused = model.forward_fusion(image, text)[0]
        for block in model.blocks:
            block.attn.fused_attn = False
        torch.testing.assert_close(model.forward_fusion(image, text)[0], fused, atol=1e-5, rtol=1e-5)
    model.train().set_grad_checkpointing(True)
    loss = model.encode_text(text).square().sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(False)
    torch.testing.assert_close(model.encode_text(text).square().sum(), loss)
    model.encode_text(text).square().sum().backward()
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


# ------------------------------------------------------------------------------------------- routing
def record_routing(model):
    """Forward hooks on every block's modality experts and VL FFN: what each received."""
    seen = {"experts": {}, "vl": {}}
    handles = []
    for i, block in enumerate(model.blocks):

        def on_experts(module, args, output, i=i):
            routing = args[1]  # Experts.forward(tokens, routing, plan)
            seen["experts"][i] = routing.expert_index.reshape(-1)  # [B*N] expert of each token

        handles.append(block.mlp.moe.experts.register_forward_hook(on_experts))
        if block.mlp.vl_ffn is not None:
            handles.append(
                block.mlp.vl_ffn.register_forward_hook(lambda m, a, o, i=i: seen["vl"].__setitem__(i, a[0].shape))
            )
    return seen, handles


@pytest.mark.parametrize("vl_start", [2, 1])
def test_fusion_routing_by_hooks_and_routing_stats(vl_start):
    model = tiny(vlffn_start_layer_index=vl_start)
    image, text = inputs(text_len=9)
    seen, handles = record_routing(model)
    model.forward_fusion(image, text)
    for handle in handles:
        handle.remove()
    num_image = 1 + 16
    expected = torch.cat([torch.ones(2, 9), torch.zeros(2, num_image)], 1).long().reshape(-1)  # text=1, image=0
    assert model.blocks[0].mlp.modalities == ("image", "text")
    assert sorted(seen["experts"]) == list(range(vl_start))  # modality experts only below the VL start
    for i in range(vl_start):
        assert torch.equal(seen["experts"][i], expected)
    assert seen["vl"] == {i: torch.Size([2, 9 + num_image, 64]) for i in range(vl_start, 4)}  # every token
    stats = mome.routing_stats(model)
    assert sorted(stats) == [f"blocks.{i}.mlp.moe" for i in range(vl_start)]
    for i in range(vl_start):
        torch.testing.assert_close(stats[f"blocks.{i}.mlp.moe"]["expert_load_per_modality"], torch.eye(2))


def test_dual_encoder_routing():
    model = tiny()
    image, text = inputs()
    seen, handles = record_routing(model)
    model.encode_image(image)
    assert seen["vl"] == {} and all(torch.all(e == 0) for e in seen["experts"].values()) and len(seen["experts"]) == 4
    for stat in mome.routing_stats(model).values():
        torch.testing.assert_close(stat["expert_load"], torch.tensor([1.0, 0.0]))
    model.encode_text(text)
    assert seen["vl"] == {} and all(torch.all(e == 1) for e in seen["experts"].values())
    model.encode_text(text, vlffn=True)  # ITC-VL branch: VL-FFN from the start index on
    assert sorted(seen["vl"]) == [2, 3]
    for handle in handles:
        handle.remove()


# ------------------------------------------------------------------------------------------- positions
def test_relative_position_indices():
    window = (3, 3)
    image = image_relative_position_index(window)
    coords = [(y, x) for y in range(3) for x in range(3)]
    for i, (y1, x1) in enumerate(coords):
        for j, (y2, x2) in enumerate(coords):
            assert image[i + 1, j + 1] == (y1 - y2 + 2) * 5 + (x1 - x2 + 2)
    assert image[0, 1:].unique().tolist() == [25] and image[1:, 0].unique().tolist() == [26] and image[0, 0] == 27
    text = text_relative_position_index(6, rel_pos_text_len=8, offset=30)
    for i in range(1, 6):
        for j in range(1, 6):
            assert text[i, j] == 30 + (j - i) + 6  # key minus query, as upstream
    assert text[0, 1:].unique().tolist() == [43] and text[1:, 0].unique().tolist() == [44] and text[0, 0] == 45
    fused = fusion_relative_position_index(text, image, num_image_rows=28)
    assert fused.shape == (16, 16) and torch.all(fused[:6, 6:] == 28) and torch.all(fused[6:, :6] == 29)
    assert torch.equal(fused[:6, :6], text) and torch.equal(fused[6:, 6:], image)
    with pytest.raises(ValueError, match="rel_pos_text_len"):
        text_relative_position_index(9, rel_pos_text_len=8, offset=0)


def test_full_text_length_uses_every_row_of_the_base_table():
    model = VLMo(
        max_text_len=196,
        rel_pos_text_len=196,
        depth=1,
        embed_dim=32,
        num_heads=1,
        vocab_size=10,
        vlffn_start_layer_index=1,
    )
    rows = model.relative_position_bias_table.shape[0]
    assert rows == 1126
    assert torch.equal(model.text_imag_relative_position_index.unique(), torch.arange(rows))
    assert model.text_relative_position_index[1, 1] == 928  # upstream: (0 - 0) - (2 - 196) + 732 + 2
    cropped = fusion_relative_position_index(
        model.text_relative_position_index[:5, :5], model.relative_position_index, 732
    )
    assert torch.equal(model.fusion_position_index(5), cropped)


def test_shared_table_chunks_are_per_layer():
    model = tiny().eval()
    image, text = inputs()
    heads = model.num_heads
    captured = {}

    def capture(i):
        def hook(module, args, kwargs, output):
            captured[i] = (kwargs["attn_bias"].clone(), output.clone())

        return hook

    handles = [b.attn.register_forward_hook(capture(i), with_kwargs=True) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model.forward_fusion(image, text)
        before = dict(captured)
        layer = 2
        delta = torch.randn(model.relative_position_bias_table.shape[0], heads)
        model.relative_position_bias_table[:, layer * heads : (layer + 1) * heads] += delta
        model.forward_fusion(image, text)
    for handle in handles:
        handle.remove()
    index = model.fusion_position_index(text.shape[1])
    for i in range(model.depth):
        bias_change = captured[i][0] - before[i][0]
        if i == layer:
            torch.testing.assert_close(bias_change, delta[index].permute(2, 0, 1).unsqueeze(0).expand_as(bias_change))
        else:
            assert torch.all(bias_change == 0)
        if i < layer:  # same input, same bias: same attention output; layer j's own output changes
            torch.testing.assert_close(captured[i][1], before[i][1])
        elif i == layer:
            assert not torch.allclose(captured[i][1], before[i][1])
    biases = model.relative_position_bias(model.relative_position_index)
    assert len(biases) == 4 and biases[0].shape == (heads, 17, 17)
    gathered = model.relative_position_bias_table[model.relative_position_index]  # [17, 17, heads * depth]
    torch.testing.assert_close(biases[layer], gathered[..., layer * heads : (layer + 1) * heads].permute(2, 0, 1))


def test_base_plus_style_positions():
    model = tiny(use_rel_pos_bias=False, use_abs_pos_emb=True, use_layer_scale=False)
    assert model.relative_position_bias_table is None and model.pos_embed.shape == (1, 17, 64)
    image, text = inputs()
    (model.encode_image(image).sum() + model.encode_text(text).sum() + model.itm_logits(image, text).sum()).backward()
    assert model.pos_embed.grad is not None and model.text_embeddings.position_embeddings.weight.grad is not None
    assert model.blocks[0].gamma_1 is None


# ------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("config_name", VLMO_CONFIGS)
def test_every_config_instantiates(config_name):
    cfg = OmegaConf.load(CONF_MODEL / config_name)
    assert cfg.model_name == config_name.removesuffix(".yaml")
    with torch.device("meta"):
        model = instantiate(cfg)
        lowered = instantiate(OmegaConf.merge(cfg, OmegaConf.from_dotlist(["vlffn_start_layer_index=1"])))
    assert isinstance(model, VLMo) and model.vlffn_start_layer_index == cfg.vlffn_start_layer_index
    assert model.max_text_len == cfg.max_text_len
    assert [b.has_vl_expert for b in lowered.blocks] == [False] + [True] * (len(lowered.blocks) - 1)


def test_save_and_reload_tiny(tmp_path):
    model = tiny(vlffn_start_layer_index=3).eval()
    image, text = inputs()
    mome.save_pretrained(model, tmp_path / "vlmo")
    loaded = mome.create_model(f"local-dir:{tmp_path / 'vlmo'}").eval()
    assert loaded.vlffn_start_layer_index == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, text)[0], model(image, text)[0])
        torch.testing.assert_close(loaded.forward_fusion(image, text)[1], model.forward_fusion(image, text)[1])


def test_invalid_arguments():
    with pytest.raises(ValueError, match="vlffn_start_layer_index"):
        tiny(vlffn_start_layer_index=5)
    with pytest.raises(ValueError, match="max_text_len"):
        tiny().encode_text(torch.randint(1, 1000, (1, 17)))
