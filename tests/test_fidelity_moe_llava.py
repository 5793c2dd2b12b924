"""MoE-LLaVA against outputs PKU-YuanGroup/MoE-LLaVA's own code produced (tests/data/upstream/moe_llava_<family>/).

Each fixture folder holds one tiny model per training stage of one LLM family, written by the upstream code
(``tools/upstream_moe_llava.py``; see each folder's README): ``stage1/mm_projector.bin`` (stage I, the
projector only), ``stage2/`` (dense LLaVA, ``save_pretrained``) and ``moe/`` (MoE-tuned, 4 experts top-2 in
layers 0 and 2, DeepSpeed 0.9.5 MoE, ``save_pretrained``), the inputs (upstream's single ``-200`` id per
image) and the upstream forward's outputs: logits, projected image features, each MoE layer's router
logits, combine weights ``[S, E]`` and ``l_aux``, and 4 greedily generated tokens per prompt. The MoE runs
start from ``torch.manual_seed(1234)``: DeepSpeed samples the second expert with Gumbel noise also at
evaluation, and mome's ``top2_2nd_expert_sampling=True`` draws the same noise. ``moe_drop_outputs`` reran
the same checkpoint with a small eval capacity (and a ``min_capacity``), so DeepSpeed drops assignments.

Every model is built through the public routes: ``create_model(arch, checkpoint_path=..., checkpoint_format=
"moe_llava", **TINY)`` and the card ``create_model("arch.tag", pretrained=True, pretrained_cfg_overlay=
dict(file=...), **TINY)``. Diffs are absolute (logits stay below about 10). Generated tokens count as a
diff of 0 when all agree.

Not covered: fp16/bf16 (upstream evaluates in fp16 on GPU; the fixtures are fp32 on CPU), padded batches
(upstream re-pads after splicing images; the fixture prompts splice to equal lengths), flash attention,
and the released full-size configs (the tiny ones keep each family's layer types, norms, rotary fractions).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from fidelity import FidelityCase, fixture_dir, fixture_meta, max_abs_diff
from safetensors.torch import load_file, save_file

import mome

ARCH = {"phi": "moe_llava_phi2_2_7b_e4", "stablelm": "moe_llava_stablelm_1_6b_e4", "qwen": "moe_llava_qwen_1_8b_e4"}
#: the generator's tiny sizes (tools/upstream_moe_llava.py: VISION, VOCAB, WIDTH, HEADS, LAYERS, FFN)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4
)
TEXT = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
PLACEHOLDER = TEXT["vocab_size"] - 1  # mome's image placeholder id (never text in the fixtures)
TINY = dict(vision_overrides=VISION, text_overrides=TEXT, image_token_index=PLACEHOLDER)
UPSTREAM_IMAGE = -200
RUN_SEED = 1234
NEW_TOKENS = 4
MOE_LAYERS = (0, 2)
#: eval-capacity variants the generator reran (DROP_VARIANTS there)
DROP = {
    "phi": dict(eval_capacity_factor=0.5, min_capacity=0),
    "stablelm": dict(eval_capacity_factor=0.5, min_capacity=20),
    "qwen": dict(eval_capacity_factor=0.25, min_capacity=4),
}


def folder(family: str) -> Path:
    return fixture_dir(f"moe_llava_{family}")


@cache
def _tensors(family: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(folder(family) / f"{name}.safetensors")


def expand(ids: torch.Tensor, mask: torch.Tensor, num_patches: int) -> list[list[int]]:
    """Upstream prompts (one ``-200`` per image, right-padded) -> mome's (``num_patches`` placeholders per image)."""
    rows = []
    for row, keep in zip(ids.tolist(), mask.bool().tolist(), strict=True):
        seq: list[int] = []
        for token in (t for t, k in zip(row, keep, strict=True) if k):
            seq += [PLACEHOLDER] * num_patches if token == UPSTREAM_IMAGE else [token]
        rows.append(seq)
    return rows


def build(family: str, stage: str, route: str, **kwargs) -> torch.nn.Module:
    """The mome model of one fixture checkpoint through a public route (``"path"`` or ``"card"``)."""
    files = {"stage1": "stage1/mm_projector.bin", "stage2": "stage2", "moe": "moe"}
    path = folder(family) / files[stage]
    if route == "card":
        tag = {"stage1": "stage1_projector", "stage2": "stage2_dense", "moe": "moe_tuned"}[stage]
        name = f"{ARCH[family]}.{tag}"
        return mome.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY, **kwargs)
    if stage == "stage1":
        kwargs = dict(converter_options={"projector_only": True}, moe_layers="none", **kwargs)
    elif stage == "stage2":
        kwargs.setdefault("moe_layers", "none")
    return mome.create_model(ARCH[family], checkpoint_path=path, checkpoint_format="moe_llava", **TINY, **kwargs)


def run(model: torch.nn.Module, family: str, routing: bool) -> dict[str, torch.Tensor]:
    """mome's forward (logits, image features, routing) and per-prompt greedy generation, seeded as upstream."""
    model = model.eval()
    inputs = _tensors(family, "inputs")
    images = inputs["images"]
    prompts = expand(inputs["input_ids"], inputs["attention_mask"], model.num_image_tokens)
    assert len({len(p) for p in prompts}) == 1, "the fixture's prompts splice to one length"
    out: dict[str, torch.Tensor] = {}
    hooks = [
        model.projector.register_forward_hook(lambda m, a, o: out.__setitem__("image_features", o.detach().clone()))
    ]
    if routing:
        for index in MOE_LAYERS:
            moe = model.language_model.layers[index].mlp
            hooks.append(moe.experts.register_forward_pre_hook(_record_routing(out, index)))
    with torch.no_grad():
        torch.manual_seed(RUN_SEED)
        out["logits"] = model(input_ids=torch.tensor(prompts), pixel_values=images).logits
        for hook in hooks:
            hook.remove()
        if routing:
            stats = mome.routing_stats(model)
            for index in MOE_LAYERS:
                out[f"l_aux.{index}"] = stats[f"model.language_model.layers.{index}.mlp"]["loss/load_balance"]
        generated, first = [], 0
        for row, ids in enumerate(inputs["input_ids"]):
            count = int((ids == UPSTREAM_IMAGE).sum())
            torch.manual_seed(RUN_SEED)
            tokens = model.generate(
                input_ids=torch.tensor([prompts[row]]),
                pixel_values=images[first : first + count],
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=0,
            )
            generated.append(tokens[0, -NEW_TOKENS:])
            first += count
        out["generated"] = torch.stack(generated)
    return out


def _record_routing(out: dict, index: int):
    def hook(module, args):
        _, routing, _, _ = args  # Experts.forward(tokens, routing after capacity, plan, dispatch)
        weights = torch.zeros_like(routing.router_probs)  # [T, E]
        weights.scatter_add_(1, routing.expert_index, routing.combine_weights.to(weights.dtype))
        out[f"combine_weights.{index}"] = weights
        out[f"router_logits.{index}"] = routing.router_logits.detach().clone()

    return hook


def diffs(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{output: max abs diff}`` for every output upstream produced (all must be present in ``ours``)."""
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"mome produced no {missing}"
    return {name: max_abs_diff(ours[name], theirs[name]) for name in sorted(theirs)}


def compare_moe(family: str, route: str, drop: bool = False):
    def compare() -> dict[str, float]:
        options = dict(DROP[family]) if drop else {}
        if route == "path":
            options["top2_2nd_expert_sampling"] = True  # the card sets it; the family's default is deterministic
        model = build(family, "moe", route, **options)
        return diffs(run(model, family, routing=True), _tensors(family, "moe_drop_outputs" if drop else "moe_outputs"))

    return compare


def compare_stage2(family: str, route: str, upcycle: bool = False):
    def compare() -> dict[str, float]:
        options = dict(moe_layers="every_2_from_0", converter_options={"upcycle_dense": True}) if upcycle else {}
        model = build(family, "stage2", route, **options)
        if upcycle:
            assert model.moe_layers == list(MOE_LAYERS)
        return diffs(run(model, family, routing=False), _tensors(family, "stage2_outputs"))

    return compare


def compare_stage1(family: str, route: str):
    def compare() -> dict[str, float]:
        model = build(family, "stage1", route).eval()
        reference = _tensors(family, "stage1_outputs")
        with torch.no_grad():
            projected = model.projector(reference["image_tower_features"])
        return {"projected": max_abs_diff(projected, reference["projected"])}

    return compare


NAMES = {"phi": "Phi-2", "stablelm": "StableLM", "qwen": "Qwen"}
CASES: list[FidelityCase] = []
for _family in ARCH:
    _folder = f"moe_llava_{_family}"
    for _route in ("path", "card"):
        _via = "checkpoint_path" if _route == "path" else "card"
        _label = f"MoE-LLaVA-{NAMES[_family]}"

        def _card(tag: str, family: str = _family, route: str = _route) -> tuple[str, ...]:
            return (f"{ARCH[family]}.{tag}",) if route == "card" else ()

        CASES += [
            FidelityCase(
                f"{_label} MoE-tuned (E=4, top-2, Gumbel), {_via}, fp32",
                _folder,
                compare_moe(_family, _route),
                cards=_card("moe_tuned"),
            ),
            FidelityCase(
                f"{_label} MoE-tuned, eval capacity {DROP[_family]['eval_capacity_factor']} "
                f"(min {DROP[_family]['min_capacity']}, drops), {_via}, fp32",
                _folder,
                compare_moe(_family, _route, drop=True),
            ),
            FidelityCase(
                f"{_label} stage II dense, {_via}, fp32",
                _folder,
                compare_stage2(_family, _route),
                cards=_card("stage2_dense"),
            ),
            FidelityCase(
                f"{_label} stage I projector, {_via}, fp32",
                _folder,
                compare_stage1(_family, _route),
                cards=_card("stage1_projector"),
            ),
        ]
    CASES.append(
        FidelityCase(
            f"MoE-LLaVA-{NAMES[_family]} stage II upcycled into E=4 (converter upcycle_dense), fp32",
            _folder,
            compare_stage2(_family, "path", upcycle=True),
        )
    )

#: which fixture covers which zoo card (tests/test_zoo_cards or the lead's coverage test may read it)
CARD_FIXTURES = {
    f"{ARCH[f]}.{tag}": f"moe_llava_{f}" for f in ARCH for tag in ("moe_tuned", "stage2_dense", "stage1_projector")
}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fidelity(case):
    case.check()


def test_fixtures_name_the_upstream_and_cover_every_moe_llava_card():
    for family in ARCH:
        meta = fixture_meta(f"moe_llava_{family}")
        assert meta["upstream"] == "PKU-YuanGroup/MoE-LLaVA" and len(meta["commit"]) == 40
        assert meta["generator"] == "tools/upstream_moe_llava.py"
    cards = {p.stem for p in mome.zoo_dir().glob("moe_llava_*.yaml")}
    assert cards == set(CARD_FIXTURES) == {card for case in CASES for card in case.cards}


def test_the_gumbel_noise_matters_and_deterministic_routing_differs():
    """Without ``top2_2nd_expert_sampling`` the second expert of some tokens differs from upstream's, so the
    fixture does test the sampled choice (and mome's default routing is deterministic)."""
    model = build("stablelm", "moe", "path").eval()
    ours = run(model, "stablelm", routing=True)
    theirs = _tensors("stablelm", "moe_outputs")
    assert max_abs_diff(ours["combine_weights.0"], theirs["combine_weights.0"]) > 1e-2
    assert max_abs_diff(ours["router_logits.0"], theirs["router_logits.0"]) < 1e-5
    again = run(model, "stablelm", routing=True)
    torch.testing.assert_close(again["logits"], ours["logits"], rtol=0, atol=0)


# -- bad input ------------------------------------------------------------------------------------------
def _corrupt(tmp_path: Path, family: str, edit) -> Path:
    """A copy of the fixture's MoE folder whose weights ``edit`` changed."""
    copy = tmp_path / f"moe_llava_{family}"
    copy.mkdir()
    for file in (folder(family) / "moe").iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    state = load_file(copy / "model.safetensors")
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, copy / "model.safetensors")
    return copy


EXPERT = "model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.1.fc1.weight"
BAD = {
    "missing expert": (
        lambda s: s.pop(EXPERT),
        [EXPERT, "model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.1.fc1"],
    ),
    "missing dense": (
        lambda s: s.pop("model.layers.1.self_attn.dense.weight"),
        ["model.language_model.layers.1.self_attn.dense.weight", "upstream model.layers.1.self_attn.dense.weight"],
    ),
    "extra": (
        lambda s: s.__setitem__("model.layers.1.mlp.fc3.weight", torch.zeros(4, 4)),
        ["model.layers.1.mlp.fc3.weight", "upstream layer model.layers.1.mlp.fc3"],
    ),
    "mis-shaped": (
        lambda s: s.__setitem__("model.layers.0.self_attn.q_proj.weight", torch.zeros(32, 16)),
        ["mis-shaped", "model.layers.0.self_attn.q_proj.weight", "(32, 16)"],
    ),
    "mis-shaped router": (
        lambda s: s.__setitem__("model.layers.0.mlp.deepspeed_moe.gate.wg.weight", torch.zeros(3, 32)),
        ["model.layers.0.mlp.deepspeed_moe.gate.wg.weight", "(3, 32)"],
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_corrupted_checkpoint_names_the_key_and_layer_and_loads_nothing(tmp_path, kind):
    edit, expected = BAD[kind]
    bad = _corrupt(tmp_path, "phi", edit)
    model = mome.create_model(ARCH["phi"], top2_2nd_expert_sampling=True, **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mome.CheckpointMismatchError) as err:
        mome.load_checkpoint_file(model, bad, "moe_llava")
    for text in expected:
        assert text in str(err.value), (text, str(err.value))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed load changed the model"
    with pytest.raises(mome.CheckpointMismatchError):
        mome.create_model(ARCH["phi"], checkpoint_path=bad, checkpoint_format="moe_llava", **TINY)
    card = dict(file=str(bad))
    with pytest.raises(mome.CheckpointMismatchError):
        mome.create_model(f"{ARCH['phi']}.moe_tuned", pretrained=True, pretrained_cfg_overlay=card, **TINY)


def test_a_stage1_file_with_more_than_the_projector_is_refused(tmp_path):
    state = torch.load(folder("phi") / "stage1" / "mm_projector.bin", weights_only=True)
    state["model.layers.0.mlp.fc1.weight"] = torch.zeros(64, 32)
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path)
    with pytest.raises(mome.CheckpointMismatchError, match=r"model\.layers\.0\.mlp\.fc1\.weight"):
        mome.create_model(
            ARCH["phi"],
            checkpoint_path=path,
            checkpoint_format="moe_llava",
            converter_options={"projector_only": True},
            moe_layers="none",
            **TINY,
        )
