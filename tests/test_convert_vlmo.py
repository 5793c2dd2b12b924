"""unilm VLMo checkpoints: key map, text-position cropping, the shared relative-position table and its
stored indices (checked against an independent rebuild of upstream's layout), resizing, strict errors,
and torch files that would run code."""

import math

import pytest
import torch
import torch.nn.functional as F

import mome
from mome.convert import CONVERTERS, load_converted, read_checkpoint
from mome.models.vlmo import VLMo

D, HEADS, DEPTH, VL_FROM, VOCAB, PATCH = 32, 4, 3, 2, 50, 8
CKPT_TEXT_LEN = 12  # upstream's max_text_len_of_initckpt (196 for the released models)


def upstream_indices(window, text_len, text_len_init):
    """Index tensors as upstream's ``VLMo.build_relative_position_embed`` lays them out (written from its
    description: BEiT image offsets + 3 CLS rows, text->image, image->text, text offsets + 3 CLS rows)."""
    wh, ww = window
    image_rows = (2 * wh - 1) * (2 * ww - 1) + 3
    all_rows = image_rows + 2 * text_len_init + 2
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # [2, P]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [P, P, 2] query minus key
    flat = (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)
    image = torch.zeros(wh * ww + 1, wh * ww + 1, dtype=torch.long)
    image[1:, 1:] = flat
    image[0, :], image[:, 0], image[0, 0] = image_rows - 3, image_rows - 2, image_rows - 1
    pos = torch.arange(text_len - 1)
    text = torch.zeros(text_len, text_len, dtype=torch.long)
    text[1:, 1:] = (pos[None, :] - pos[:, None]) - (2 - text_len_init) + image_rows + 2
    text[0, :], text[:, 0], text[0, 0] = all_rows - 3, all_rows - 2, all_rows - 1
    top = torch.cat([text, torch.full((text_len, image.shape[0]), image_rows)], 1)
    bottom = torch.cat([torch.full((image.shape[0], text_len), image_rows + 1), image], 1)
    return image, text, torch.cat([top, bottom], 0), all_rows


def upstream_state(img_size=16, text_len=CKPT_TEXT_LEN, seed=0, abs_pos=False, vl_from=VL_FROM):
    """A raw upstream state dict (real names, shapes and orientations) for a tiny VLMo."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    hidden = 4 * D
    state = {
        "transformer.cls_token": rnd(1, 1, D),
        "transformer.patch_embed.proj.weight": rnd(D, 3, PATCH, PATCH),
        "transformer.patch_embed.proj.bias": rnd(D),
        "transformer.norm.weight": 1 + rnd(D),
        "transformer.norm.bias": rnd(D),
    }
    if abs_pos:
        state["transformer.pos_embed"] = rnd(1, (img_size // PATCH) ** 2 + 1, D)
    for i in range(DEPTH):
        b = f"transformer.blocks.{i}."
        state.update({b + "norm1.weight": 1 + rnd(D), b + "norm1.bias": rnd(D)})
        state.update({b + "attn.q_bias": rnd(D), b + "attn.v_bias": rnd(D), b + "attn.qkv.weight": rnd(3 * D, D)})
        state.update({b + "attn.proj.weight": rnd(D, D), b + "attn.proj.bias": rnd(D)})
        if not abs_pos:
            state.update({b + "gamma_1": rnd(D), b + "gamma_2": rnd(D)})
        for m in ("text", "imag") + (("vl",) if i >= vl_from else ()):
            state.update({f"{b}norm2_{m}.weight": 1 + rnd(D), f"{b}norm2_{m}.bias": rnd(D)})
            state.update({f"{b}mlp_{m}.fc1.weight": rnd(hidden, D), f"{b}mlp_{m}.fc1.bias": rnd(hidden)})
            state.update({f"{b}mlp_{m}.fc2.weight": rnd(D, hidden), f"{b}mlp_{m}.fc2.bias": rnd(D)})
    if not abs_pos:
        image, text, fusion, rows = upstream_indices((img_size // PATCH,) * 2, text_len, CKPT_TEXT_LEN)
        state["relative_position_bias_table"] = rnd(rows, HEADS * DEPTH)
        state.update(
            relative_position_index=image, text_relative_position_index=text, text_imag_relative_position_index=fusion
        )
    state.update(
        {
            "text_embeddings.position_ids": torch.arange(text_len)[None],
            "text_embeddings.word_embeddings.weight": rnd(VOCAB, D),
            "text_embeddings.position_embeddings.weight": rnd(text_len, D),
            "text_embeddings.token_type_embeddings.weight": rnd(2, D),
            "text_embeddings.LayerNorm.weight": 1 + rnd(D),
            "text_embeddings.LayerNorm.bias": rnd(D),
            "token_type_embeddings.weight": rnd(2, D),
            "pooler.dense.weight": rnd(D, D),
            "pooler.dense.bias": rnd(D),
            "itm_score.fc.weight": rnd(2, D),
            "itm_score.fc.bias": rnd(2),
            "logit_scale": torch.tensor(math.log(1 / 0.07)),
            "logit_vl_scale": torch.tensor(math.log(1 / 0.07)),
            "mlm_score.bias": rnd(VOCAB),
            "mlm_score.transform.dense.weight": rnd(D, D),
            "mlm_score.transform.dense.bias": rnd(D),
            "mlm_score.transform.LayerNorm.weight": 1 + rnd(D),
            "mlm_score.transform.LayerNorm.bias": rnd(D),
            "mlm_score.decoder.weight": rnd(VOCAB, D),
        }
    )
    for name in ("itc_text_proj", "itc_image_proj", "itc_vl_text_proj", "itc_vl_image_proj"):
        state[f"{name}.fc.weight"] = rnd(D, D)
    return state


def tiny_vlmo(img_size=16, max_text_len=8, **kwargs):
    args = dict(
        img_size=img_size, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, vlffn_start_layer_index=VL_FROM,
        vocab_size=VOCAB, max_text_len=max_text_len, rel_pos_text_len=CKPT_TEXT_LEN,
    )  # fmt: skip
    return VLMo(**{**args, **kwargs}).eval()


def upstream_block(x, state, i, modality, bias):
    """Upstream's multiway Block on one modality: BEiT attention (+ relative bias), layer scale, modality FFN."""
    b = f"transformer.blocks.{i}."
    y = F.layer_norm(x, (D,), state[b + "norm1.weight"], state[b + "norm1.bias"], eps=1e-6)
    qkv_bias = torch.cat([state[b + "attn.q_bias"], torch.zeros(D), state[b + "attn.v_bias"]])
    q, k, v = (
        F.linear(y, state[b + "attn.qkv.weight"], qkv_bias).reshape(*x.shape[:2], 3, HEADS, -1).permute(2, 0, 3, 1, 4)
    )
    logits = (q * (D // HEADS) ** -0.5) @ k.transpose(-2, -1) + bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    x = x + state[b + "gamma_1"] * F.linear(out, state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
    y = F.layer_norm(x, (D,), state[f"{b}norm2_{modality}.weight"], state[f"{b}norm2_{modality}.bias"], eps=1e-6)
    h = F.gelu(F.linear(y, state[f"{b}mlp_{modality}.fc1.weight"], state[f"{b}mlp_{modality}.fc1.bias"]))
    return x + state[b + "gamma_2"] * F.linear(
        h, state[f"{b}mlp_{modality}.fc2.weight"], state[f"{b}mlp_{modality}.fc2.bias"]
    )


def upstream_layer_bias(state, index, layer):
    """Upstream's ``get_rel_pos_bias``: embed the index in the shared table, heads-first, chunk per layer."""
    bias = F.embedding(index, state["relative_position_bias_table"]).permute(2, 0, 1)  # [heads*depth, N, N]
    return bias.chunk(DEPTH, dim=0)[layer]


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "vlmo_tiny.pt"
    torch.save(upstream_state(), path)
    return path


def test_converted_vlmo_matches_upstream_blocks_and_biases(ckpt):
    state = upstream_state()
    model = tiny_vlmo()
    model.load_state_dict(load_converted(ckpt, "unilm_vlmo", "unilm_vlmo", model), strict=True)
    # per-layer relative-position biases of the fusion and image paths, from upstream's table and indices
    # rebuilt for the model's text length (upstream rebuilds them for max_text_len, laid out for 196 = CKPT_TEXT_LEN)
    image_index, text_index, fusion_index, _ = upstream_indices((2, 2), 8, CKPT_TEXT_LEN)
    for index, ours_index in (
        (fusion_index, model.text_imag_relative_position_index),
        (image_index, model.relative_position_index),
    ):
        ours = model.relative_position_bias(ours_index)
        for layer in range(DEPTH):
            torch.testing.assert_close(ours[layer], upstream_layer_bias(state, index, layer), rtol=0, atol=0)
    # a text block and an image block against upstream's computation
    x = torch.randn(2, 8, D)
    text_ids = torch.ones(2, 8, dtype=torch.long)
    bias = model.relative_position_bias(model.text_relative_position_index)[1]
    with torch.no_grad():
        ours = model.blocks[1](x, torch.ones_like(text_ids), attn_bias=bias)
        theirs = upstream_block(x, state, 1, "text", upstream_layer_bias(state, text_index, 1))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        x = torch.randn(2, 5, D)
        ours = model.blocks[0](
            x,
            torch.zeros(2, 5, dtype=torch.long),
            attn_bias=model.relative_position_bias(model.relative_position_index)[0],
        )
        theirs = upstream_block(x, state, 0, "imag", upstream_layer_bias(state, image_index, 0))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # renamed heads, cropped text positions, VL expert
    torch.testing.assert_close(model.itm_score.weight, state["itm_score.fc.weight"])
    torch.testing.assert_close(
        model.text_embeddings.position_embeddings.weight, state["text_embeddings.position_embeddings.weight"][:8]
    )
    torch.testing.assert_close(model.blocks[2].mlp.vl_ffn.fc1.weight, state["transformer.blocks.2.mlp_vl.fc1.weight"])
    torch.testing.assert_close(
        model.blocks[2].mlp.moe.experts.w_out[1], state["transformer.blocks.2.mlp_text.fc2.weight"]
    )


@pytest.mark.parametrize("wrapper", ["state_dict", "module", "model"])
def test_wrapped_checkpoints_are_unwrapped(tmp_path, wrapper):
    state = upstream_state()
    if wrapper == "module":
        state = {"module." + k: v for k, v in state.items()}
    torch.save({wrapper: state, "epoch": 3}, tmp_path / "wrapped.pt")
    model = tiny_vlmo()
    converted = load_converted(tmp_path / "wrapped.pt", "unilm_vlmo", "unilm_vlmo", model)
    assert set(converted) == set(model.state_dict())


def test_upstream_heads_are_reported_unless_ignored(tmp_path):
    state = upstream_state()
    state.update({"vqa_classifier.0.weight": torch.zeros(2 * D, D), "vqa_classifier.3.bias": torch.zeros(7)})
    torch.save(state, tmp_path / "vqa.pt")
    model = tiny_vlmo()
    with pytest.raises(mome.CheckpointMismatchError, match=r"vqa\.pt.*\n.*no counterpart.*vqa_classifier\.0\.weight"):
        load_converted(tmp_path / "vqa.pt", "unilm_vlmo", "unilm_vlmo", model)
    converted = load_converted(
        tmp_path / "vqa.pt", "unilm_vlmo", "unilm_vlmo", model, ignore_prefixes=["vqa_classifier."]
    )
    assert not any(k.startswith("vqa") for k in converted)


def test_missing_and_misshaped_keys_are_named():
    model = tiny_vlmo()
    state = upstream_state()
    del state["transformer.blocks.1.mlp_imag.fc2.bias"]
    state["token_type_embeddings.weight"] = torch.zeros(3, D)  # NLVR2's three token types
    with pytest.raises(mome.CheckpointMismatchError) as info:
        CONVERTERS["unilm_vlmo"](state, model)
    message = str(info.value)
    assert "transformer.blocks.1.mlp_imag.fc2.bias" in message
    assert "blocks.1.mlp.moe.experts.b_out" in message  # the model key left without a value
    assert "token_type_embeddings.weight <- token_type_embeddings.weight: (3, 32) vs model (2, 32)" in message


def test_stage2_checkpoint_without_vl_experts_is_reported():
    state = upstream_state(vl_from=DEPTH)
    with pytest.raises(mome.CheckpointMismatchError, match="transformer.blocks.2.mlp_vl.fc1.weight"):
        CONVERTERS["unilm_vlmo"](state, tiny_vlmo())
    converted = CONVERTERS["unilm_vlmo"](state, tiny_vlmo(vlffn_start_layer_index=DEPTH))
    assert "blocks.2.mlp.vl_ffn.fc1.weight" not in converted


def test_tied_decoder_needs_equal_upstream_tensors():
    state = upstream_state()
    with pytest.raises(mome.CheckpointMismatchError, match="ties mlm_score.decoder.weight"):
        CONVERTERS["unilm_vlmo"](state, tiny_vlmo(tie_mlm_decoder=True))
    state["mlm_score.decoder.weight"] = state["text_embeddings.word_embeddings.weight"].clone()
    assert "mlm_score.decoder.weight" in CONVERTERS["unilm_vlmo"](state, tiny_vlmo(tie_mlm_decoder=True))


def test_stored_index_of_another_layout_is_refused():
    state = upstream_state()
    state["text_relative_position_index"] = state["text_relative_position_index"].flip(0)
    with pytest.raises(mome.CheckpointMismatchError, match="text_relative_position_index stored in the checkpoint"):
        CONVERTERS["unilm_vlmo"](state, tiny_vlmo())


def test_higher_resolution_resizes_the_table_and_keeps_text_rows():
    state = upstream_state(img_size=32)
    model = tiny_vlmo(img_size=48)  # 6x6 patches instead of 4x4
    converted = CONVERTERS["unilm_vlmo"](state, model)
    table = converted["relative_position_bias_table"]
    assert table.shape == model.relative_position_bias_table.shape
    old_offsets, new_offsets = 7 * 7, 11 * 11
    torch.testing.assert_close(table[new_offsets:], state["relative_position_bias_table"][old_offsets:])
    torch.testing.assert_close(
        table[new_offsets // 2], state["relative_position_bias_table"][old_offsets // 2]
    )  # (0, 0): the spline interpolates, so the sample points keep their values


def test_a_table_too_small_for_the_bicubic_resize_is_reported():
    # upstream's interp2d(kind="cubic") cannot fit a 3x3 grid of offsets (2x2 patches) either
    with pytest.raises(mome.CheckpointMismatchError, match="3x3 offset grid is too small") as info:
        CONVERTERS["unilm_vlmo"](upstream_state(), tiny_vlmo(img_size=32))
    assert "mis-shaped" not in str(info.value)  # nothing half-converted is reported as a shape error


def test_base_plus_style_absolute_positions_are_resampled():
    from timm.layers import resample_abs_pos_embed

    state = upstream_state(abs_pos=True)
    for key in [k for k in state if "index" in k or "relative_position" in k]:
        state.pop(key, None)
    model = tiny_vlmo(img_size=32, use_abs_pos_emb=True, use_rel_pos_bias=False, use_layer_scale=False)
    converted = CONVERTERS["unilm_vlmo"](state, model)
    expected = resample_abs_pos_embed(state["transformer.pos_embed"], [4, 4], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(converted["pos_embed"], expected)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    torch.save({"transformer.cls_token": torch.zeros(1), "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(tmp_path / "evil.pt", "unilm_vlmo")
    assert not marker.exists()
