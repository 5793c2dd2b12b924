"""MoE-LLaVA: transformers contract, MoE layers, generation with the KV cache, stages, upcycling, converter."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

import mome
from mome.layers import MoE
from mome.models.moe_llava import (
    MOE_LLAVA_TINY_VOCAB,
    MoELLaVA,
    configure_stage,
    moe_llava_state_dict_from_hf,
    moe_llava_tiny_tokenizer,
)

TINY = "moe_llava_tiny_e4"
LLMS = ("phi", "stablelm", "qwen2")


def tiny(llm="phi", **kwargs):
    return mome.create_model(TINY, llm=llm, **kwargs)


def prompt_ids(model, texts_before=(1, 5, 8), num_images=1, texts_after=(17, 18, 9, 6, 8)):
    """``[bos USER :] + (image placeholders + a few words) * num_images + [... ASSISTANT :]``."""
    image = [model.config.image_token_id] * model.num_image_tokens
    ids = list(texts_before)
    for _ in range(num_images):
        ids += image + [20, 22]
    return ids + list(texts_after)


def batch_with_two_images(model):
    """Two prompts (the first with two images, the second with one), left-padded for generation."""
    first, second = prompt_ids(model, num_images=2), prompt_ids(model, num_images=1)
    pad = len(first) - len(second)
    input_ids = torch.tensor([first, [0] * pad + second])
    attention_mask = torch.tensor([[1] * len(first), [0] * pad + [1] * len(second)])
    return input_ids, attention_mask, torch.randn(3, 3, 32, 32)


# -- registry and sizes ---------------------------------------------------------------------------------
# README "activated params" (B): top-2 of 4 experts, LLM + projector (the CLIP tower is not counted).
UPSTREAM_ACTIVE = {"moe_llava_stablelm_1_6b_e4": 2.0, "moe_llava_qwen_1_8b_e4": 2.2, "moe_llava_phi2_2_7b_e4": 3.6}


@pytest.mark.parametrize("name", sorted(UPSTREAM_ACTIVE))
def test_full_size_variants_on_meta(name):
    with torch.device("meta"):
        model = mome.create_model(name)
    depth = model.config.text_config.num_hidden_layers
    assert model.moe_layers == list(range(0, depth, 2))
    assert model.num_image_tokens == 576 and model.pretrained_cfg.input_size == (3, 336, 336)
    assert model.pretrained_cfg.tokenizer.startswith("hf-hub:")
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.vision_tower.parameters())
    inactive = sum(
        (2 / 4) * sum(p.numel() for p in layer.mlp.experts.parameters())
        for layer in model.language_model.layers
        if isinstance(layer.mlp, MoE)
    )
    assert (total - vision - inactive) / 1e9 == pytest.approx(UPSTREAM_ACTIVE[name], abs=0.1)


def test_tiny_variant_parts():
    model = tiny()
    assert isinstance(model, MoELLaVA)
    assert model.moe_layers == [0, 2] and model.num_experts == 4 and model.num_image_tokens == 16
    moe = model.language_model.layers[0].mlp
    assert moe.router.top_k == 2 and moe.router.renormalize and moe.router.noise_std == 0
    assert moe.aux_loss_weights == {"load_balance": 0.01}
    assert moe.capacity_factor == 1.5 and moe.eval_capacity_factor == 2.0 and moe.min_capacity == 0
    assert moe.capacity(100) == 75  # ceil(100 * 2 * 1.5 / 4) in training
    moe.eval()
    assert moe.capacity(100) == 100  # c = 2 at evaluation: no drops
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert len(moe_llava_tiny_tokenizer()) == model.config.text_config.vocab_size
    dropless = tiny(capacity_factor="dropless", eval_capacity_factor="dropless").language_model.layers[2].mlp
    assert dropless.capacity(10) is None and dropless.eval().capacity(10) is None


# -- forward ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("llm", LLMS)
def test_forward_returns_causal_lm_output_and_records_aux_loss(llm):
    model = tiny(llm)
    ids = torch.tensor([prompt_ids(model)])
    labels = ids.clone()
    labels[ids == model.config.image_token_id] = -100
    out = model(input_ids=ids, images=torch.randn(1, 3, 32, 32), labels=labels)
    assert isinstance(out, CausalLMOutputWithPast)
    assert out.logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    expected = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    aux = mome.aux_losses(model)
    assert set(aux) == {"load_balance"} and aux["load_balance"].requires_grad
    assert aux["load_balance"].item() == pytest.approx(0.01 * 2, abs=0.01)  # two layers, each ~E*sum f*P ~ 1
    (out.loss + sum(aux.values())).backward()
    assert model.language_model.layers[0].mlp.router.proj.weight.grad.abs().sum() > 0


def test_images_enter_at_their_placeholders():
    model = tiny().eval()
    ids = torch.tensor([prompt_ids(model, num_images=2)])
    images = torch.randn(2, 3, 32, 32)
    first = ids[0].tolist().index(model.config.image_token_id)
    second = first + model.num_image_tokens + 2
    with torch.no_grad():
        base = model(input_ids=ids, pixel_values=images).logits
        changed = images.clone()
        changed[1] = torch.randn(3, 32, 32)
        other = model(input_ids=ids, pixel_values=changed).logits
    torch.testing.assert_close(base[:, :second], other[:, :second])  # causal: before image 2 nothing moves
    assert not torch.allclose(base[:, second:], other[:, second:])
    with pytest.raises(ValueError, match="pixel_values must be 2 images: input_ids hold 32 image placeholder ids"):
        model(input_ids=ids, pixel_values=images[:1])


def test_unpickled_model_runs_in_a_fresh_process(monkeypatch):
    """A model sent to a spawned process (``ddp_spawn``) is unpickled without ``__init__``: transformers'
    per-class output-capturing registry is empty there, which the model's ``__setstate__`` refills."""
    import pickle

    from transformers.utils import output_capturing

    model = tiny().eval()
    ids = torch.tensor([prompt_ids(model)])
    images = torch.randn(1, 3, 32, 32)
    payload = pickle.dumps(model)  # before any forward (which installs unpicklable hooks), as ddp_spawn does
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=images).logits
    fresh = output_capturing._CanRecordRegistry()  # a fresh process: no model class registered yet
    monkeypatch.setattr(output_capturing, "_CAN_RECORD_REGISTRY", fresh)
    restored = pickle.loads(payload)
    assert fresh, "unpickling registered nothing"
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids, pixel_values=images).logits, expected)


def test_eval_is_deterministic_and_empty_images_mean_none():
    model = tiny().eval()
    ids = torch.tensor([prompt_ids(model)])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, images).logits, model(ids, images).logits, rtol=0, atol=0)
        text = torch.tensor([[1, 5, 8, 17, 18, 9, 6, 8]])
        torch.testing.assert_close(
            model(input_ids=text, images=torch.zeros(0, 3, 32, 32)).logits, model(input_ids=text).logits
        )


# -- generation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("llm", ["phi", "qwen2"])
def test_generate_with_cache_equals_without(llm):
    model = tiny(llm).eval()
    input_ids, attention_mask, images = batch_with_two_images(model)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, images=images, max_new_tokens=8, do_sample=False)
    cached = model.generate(**kwargs, use_cache=True)
    uncached = model.generate(**kwargs, use_cache=False)
    assert cached.shape == (2, input_ids.shape[1] + 8)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    torch.manual_seed(1)
    sampled = model.generate(**kwargs | {"do_sample": True}, temperature=1.0, top_k=10)
    assert sampled.shape == cached.shape and torch.equal(sampled[:, : input_ids.shape[1]], input_ids)
    assert int(sampled.max()) < model.config.text_config.vocab_size


# -- stages and upcycling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("llm", LLMS)
def test_upcycled_model_equals_dense_with_dropless_routing(llm):
    dense = tiny(llm, moe_layers="none").eval()
    assert dense.moe_layers == [] and dense.num_experts == 0
    sparse = copy.deepcopy(dense).upcycle("every_2_from_0", capacity_factor=None, eval_capacity_factor=None).eval()
    assert sparse.moe_layers == [0, 2] and sparse.config.moe_layers == [0, 2]
    experts = sparse.language_model.layers[0].mlp.experts
    torch.testing.assert_close(experts.w_in[3], experts.w_in[0])
    ids = torch.tensor([prompt_ids(dense, num_images=2)])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids, images).logits, dense(ids, images).logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="already have an MoE"):
        sparse.upcycle([0])


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_configure_stage():
    dense = tiny(moe_layers="none")
    stage1 = trainable(configure_stage(dense, 1))
    assert stage1 and all(name.startswith("model.multi_modal_projector.") for name in stage1)
    stage2 = trainable(configure_stage(dense, 2))
    assert {n.split(".")[1] for n in stage2 if n.startswith("model.")} == {"multi_modal_projector", "language_model"}
    assert "lm_head.weight" in stage2 and not any("vision_tower" in n for n in stage2)
    with pytest.raises(ValueError, match="call model.upcycle"):
        configure_stage(dense, 3)
    sparse = dense.upcycle()
    with pytest.raises(ValueError, match="dense LLaVA"):
        configure_stage(sparse, 2)
    stage3 = trainable(configure_stage(sparse, 3))
    assert stage3 == {
        f"model.language_model.layers.{i}.mlp.{part}"
        for i in (0, 2)
        for part in ("router.proj.weight", "experts.w_in", "experts.b_in", "experts.w_out", "experts.b_out")
    }
    upstream_like = trainable(configure_stage(sparse, 3, train_dense_ffn=True))
    assert "model.language_model.layers.1.mlp.fc1.weight" in upstream_like
    assert not any("vision_tower" in n or "self_attn" in n for n in upstream_like)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny(moe_layers="none").upcycle(capacity_factor=None).eval()
    model.save_pretrained(tmp_path / "hf")
    loaded = MoELLaVA.from_pretrained(tmp_path / "hf").eval()
    assert loaded.moe_layers == [0, 2]
    ids = torch.tensor([prompt_ids(model)])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, images).logits, model(ids, images).logits)
    mome.save_pretrained(model, tmp_path / "mome")  # create_model recorded the args; upcycle updated them
    again = mome.create_model(f"local-dir:{tmp_path / 'mome'}").eval()
    assert again.moe_layers == [0, 2] and again.language_model.layers[0].mlp.capacity_factor is None
    assert loaded.language_model.layers[2].mlp.capacity_factor is None
    with torch.no_grad():
        torch.testing.assert_close(again(ids, images).logits, model(ids, images).logits)


# -- converter -------------------------------------------------------------------------------------------------
def upstream_layout(model, llm):
    """Write ``model``'s weights in the upstream moellava layout (independently of the converter)."""
    state = model.state_dict()
    out = {}
    qwen = llm == "qwen2"
    root = "transformer" if qwen else "model"
    for key, value in state.items():
        if key.startswith("model.vision_tower."):
            out[f"{root}.image_tower.image_tower.vision_model." + key.removeprefix("model.vision_tower.")] = value
        elif key.startswith("model.multi_modal_projector."):
            tail = key.removeprefix("model.multi_modal_projector.")
            tail = tail.replace("linear_1", "0").replace("linear_2", "2")
            out[f"{root}.mm_projector.image_spatial_proj.{tail}"] = value
    for index, layer in enumerate(model.language_model.layers):
        prefix = f"transformer.h.{index}." if qwen else f"model.layers.{index}."
        ours = f"model.language_model.layers.{index}."
        for key, value in state.items():
            if not key.startswith(ours) or ".mlp." in key:
                continue
            tail = key.removeprefix(ours)
            if not qwen:
                out[prefix + tail] = value
        if qwen:
            out[prefix + "ln_1.weight"] = state[ours + "input_layernorm.weight"]
            out[prefix + "ln_2.weight"] = state[ours + "post_attention_layernorm.weight"]
            for kind in ("weight", "bias"):
                qkv = [state[f"{ours}self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[prefix + f"attn.c_attn.{kind}"] = torch.cat(qkv)
            out[prefix + "attn.c_proj.weight"] = state[ours + "self_attn.o_proj.weight"]
        names = {"gate_proj": "w2", "up_proj": "w1", "down_proj": "c_proj"} if qwen else {}
        if isinstance(layer.mlp, MoE):
            moe = prefix + "mlp.deepspeed_moe."
            out[moe + "gate.wg.weight"] = layer.mlp.router.proj.weight.detach()
            experts = layer.mlp.experts
            for e in range(experts.num_experts):
                expert = f"{moe}experts.deepspeed_experts.{e}."
                if llm == "phi":
                    out[expert + "fc1.weight"] = experts.w_in[e].detach()
                    out[expert + "fc1.bias"] = experts.b_in[e].detach()
                    out[expert + "fc2.weight"] = experts.w_out[e].detach()
                    out[expert + "fc2.bias"] = experts.b_out[e].detach()
                else:
                    gate, up = experts.w_in[e].detach().chunk(2)
                    out[expert + names.get("gate_proj", "gate_proj") + ".weight"] = gate
                    out[expert + names.get("up_proj", "up_proj") + ".weight"] = up
                    out[expert + names.get("down_proj", "down_proj") + ".weight"] = experts.w_out[e].detach()
        else:
            for key, value in state.items():
                if key.startswith(ours + "mlp."):
                    part, param = key.removeprefix(ours + "mlp.").split(".")
                    out[f"{prefix}mlp.{names.get(part, part)}.{param}"] = value
    lm = model.language_model
    if qwen:
        out["transformer.wte.weight"] = lm.embed_tokens.weight.detach()
        out["transformer.ln_f.weight"] = lm.norm.weight.detach()
        out["transformer.rotary_emb.inv_freq"] = torch.ones(4)  # saved by some versions; skipped
    else:
        for key, value in state.items():
            if key.startswith("model.language_model.") and not key.startswith("model.language_model.layers."):
                out["model." + key.removeprefix("model.language_model.")] = value
    out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("llm", LLMS)
def test_converter_loads_upstream_layout_exactly(llm):
    source = tiny(llm).eval()
    upstream = upstream_layout(source, llm)
    assert any(".deepspeed_moe.experts.deepspeed_experts.3." in k for k in upstream)
    torch.manual_seed(123)
    target = tiny(llm).eval()
    target.load_state_dict(moe_llava_state_dict_from_hf(upstream, target), strict=True)
    ids = torch.tensor([prompt_ids(source)])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(ids, images).logits, source(ids, images).logits, rtol=0, atol=0)


def test_converter_is_strict():
    model = tiny()
    upstream = upstream_layout(model, "phi")
    missing = dict(upstream)
    del missing["model.layers.2.mlp.deepspeed_moe.gate.wg.weight"]
    with pytest.raises(
        mome.CheckpointMismatchError, match=r"missing key\(s\): model.language_model.layers.2.mlp.router"
    ):
        moe_llava_state_dict_from_hf(missing, model)
    extra = dict(upstream) | {"model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.4.fc1.weight": torch.ones(1)}
    with pytest.raises(mome.CheckpointMismatchError, match="mis-shaped"):
        moe_llava_state_dict_from_hf(extra, model)
    stray = dict(upstream) | {"model.video_tower.foo": torch.ones(1)}
    with pytest.raises(mome.CheckpointMismatchError, match=r"unmatched key\(s\): model.video_tower.foo"):
        moe_llava_state_dict_from_hf(stray, model)
    dense = tiny(moe_layers="none")
    with pytest.raises(mome.CheckpointMismatchError, match="unmatched"):  # an MoE checkpoint into a dense model
        moe_llava_state_dict_from_hf(upstream, dense)


# -- tokenizer ------------------------------------------------------------------------------------------------
def test_tiny_tokenizer_is_deterministic_and_covers_shapes():
    from mome.data.shapes import shapes_records

    first, second = moe_llava_tiny_tokenizer(), moe_llava_tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert (first.pad_token_id, first.bos_token_id, first.eos_token_id) == (0, 1, 2)
    assert first.convert_tokens_to_ids("<image>") == mome.create_model(TINY).config.image_token_id
    assert len(set(MOE_LLAVA_TINY_VOCAB)) == len(MOE_LLAVA_TINY_VOCAB)
    ids = first("USER: What colour is the shape? ASSISTANT: red")["input_ids"]
    assert first.decode(ids) == "user : what colour is the shape ? assistant : red"
    for record in shapes_records(300, seed=7, turns=4):
        text = " ".join(turn["value"].replace("<image>", "") for turn in record["conversations"])
        assert first.unk_token_id not in first(text)["input_ids"], text


# -- training ---------------------------------------------------------------------------------------------------
def test_tiny_model_learns_shapes():
    """A few dozen plain-PyTorch steps on synthetic shapes VQA lower the loss (LM + load balancing)."""
    from mome.data.conversation import ConversationDataset, collate_conversations
    from mome.data.shapes import shapes_records

    tokenizer = moe_llava_tiny_tokenizer()
    model = tiny().train()
    data = ConversationDataset(
        list(shapes_records(32, seed=0)),
        tokenizer,
        image_token_id=model.config.image_token_id,
        num_image_tokens=model.num_image_tokens,
        image_size=32,
    )
    batches = [
        collate_conversations([data[i] for i in range(j, j + 8)], tokenizer.pad_token_id) for j in (0, 8, 16, 24)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(24):
        out = model(**batches[step % len(batches)])
        loss = out.loss + sum(mome.aux_losses(model).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("llm", ["phi", "stablelm"])
def test_converter_upcycles_a_dense_stage2_checkpoint(llm):
    dense = tiny(llm, moe_layers="none").eval()
    upstream = upstream_layout(dense, llm)
    sparse = tiny(llm).eval()  # eval capacity factor 2 with E = 4, k = 2: no drops
    with pytest.raises(mome.CheckpointMismatchError, match="unmatched"):
        moe_llava_state_dict_from_hf(upstream, sparse)
    router = sparse.language_model.layers[0].mlp.router.proj.weight.detach().clone()
    sparse.load_state_dict(moe_llava_state_dict_from_hf(upstream, sparse, upcycle_dense=True), strict=True)
    torch.testing.assert_close(sparse.language_model.layers[0].mlp.router.proj.weight, router)
    ids = torch.tensor([prompt_ids(dense)])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids, images).logits, dense(ids, images).logits, rtol=0, atol=1e-5)


def test_a_moe_llava_card_loads_an_upstream_folder_through_the_zoo(tmp_path):
    """The card path: ``source_format: moe_llava`` (a save_pretrained folder, weights in two safetensors shards)
    and ``converter: moe_llava`` come from the one table of formats and converters, so
    ``create_model(..., pretrained=True)`` reads, converts and loads it exactly."""
    from safetensors.torch import save_file

    source = tiny("stablelm").eval()
    upstream = upstream_layout(source, "stablelm")
    keys = sorted(upstream)
    folder = tmp_path / "MoE-LLaVA-tiny"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    half = len(keys) // 2
    save_file({k: upstream[k].contiguous() for k in keys[:half]}, folder / "model-00001-of-00002.safetensors")
    save_file({k: upstream[k].contiguous() for k in keys[half:]}, folder / "model-00002-of-00002.safetensors")
    card = {"file": str(folder), "source_format": "moe_llava", "converter": "moe_llava"}
    loaded = mome.create_model(TINY, llm="stablelm", pretrained=True, pretrained_cfg_overlay=card).eval()
    ids = torch.tensor([prompt_ids(source)])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, images).logits, source(ids, images).logits, rtol=0, atol=0)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(mome.CheckpointMismatchError, match="MoE-LLaVA-tiny"):
        mome.create_model(TINY, llm="stablelm", pretrained=True, pretrained_cfg_overlay=card)


# -- DeepSpeed's top-2 gate ------------------------------------------------------------------------------------
def test_gshard_top2_router_without_sampling_is_renormalised_top2():
    from mome.layers import GShardTop2Router, TopKRouter

    torch.manual_seed(0)
    gate = GShardTop2Router(16, 4, sample_second=False)
    plain = TopKRouter(16, 4, 2, renormalize=True)
    plain.load_state_dict(gate.state_dict())
    x = torch.randn(50, 16)
    ours, theirs = gate(x), plain(x)
    assert torch.equal(ours.expert_index, theirs.expert_index) and ours.renormalize_kept
    torch.testing.assert_close(ours.combine_weights, theirs.combine_weights)


def test_gshard_top2_router_samples_the_second_expert_from_the_global_generator():
    from mome.layers import GShardTop2Router

    gate = GShardTop2Router(16, 4)  # sample_second=True: as DeepSpeed v0.9.5, also in eval mode
    gate.eval()
    x = torch.randn(200, 16) * 3
    torch.manual_seed(7)
    first = gate(x)
    torch.manual_seed(7)
    noise = torch.distributions.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).rsample((200, 4))
    torch.manual_seed(7)
    again = gate(x)
    assert torch.equal(first.expert_index, again.expert_index)
    probs = first.router_probs
    assert torch.equal(first.expert_index[:, 0], probs.argmax(-1))  # the first choice is never sampled
    masked = (first.router_logits + noise).scatter(1, first.expert_index[:, :1], float("-inf"))
    assert torch.equal(first.expert_index[:, 1], masked.argmax(-1))
    assert not torch.equal(first.expert_index[:, 1], probs.topk(2).indices[:, 1])  # the noise changes some


def test_dropped_choices_renormalise_the_kept_gate_as_deepspeed():
    model = tiny("stablelm", eval_capacity_factor=0.25).eval()  # capacity ceil(T/8): most second choices drop
    seen = {}
    moe = model.language_model.layers[0].mlp
    moe.experts.register_forward_pre_hook(lambda m, args: seen.update(routing=args[1]))  # returns None
    with torch.no_grad():
        model(torch.tensor([prompt_ids(model)]), torch.randn(1, 3, 32, 32))
    routing = seen["routing"]
    kept = ~routing.dropped
    one = kept.sum(-1) == 1
    assert one.any() and (~kept).all(-1).any()
    torch.testing.assert_close(routing.combine_weights[one].sum(-1), torch.ones(int(one.sum())))
    assert (routing.combine_weights[(~kept).all(-1)] == 0).all()


def test_top2_sampling_needs_top2_and_is_saved(tmp_path):
    with pytest.raises(ValueError, match="top2_2nd_expert_sampling"):
        tiny(top_k=1, top2_2nd_expert_sampling=True)
    model = tiny(top2_2nd_expert_sampling=True)
    assert model.language_model.layers[0].mlp.router.sample_second
    mome.save_pretrained(model, tmp_path / "m")
    again = mome.create_model(f"local-dir:{tmp_path / 'm'}")
    assert again.language_model.layers[0].mlp.router.sample_second
