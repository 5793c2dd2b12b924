"""DeepSeekMoE (Dai et al. 2024) and DeepSeek-V3's balancing (DeepSeek-AI 2024) as options of the top-k router and
:class:`~mome.layers.SparseMoE`: fine-grained expert segmentation (layer and upcycling), auxiliary-loss-free bias
balancing, the sequence-wise balance loss, device-limited routing, and the ``moe=deepseek`` recipe."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from timm.layers import Mlp, SwiGLU
from torch import nn
from train_helpers import CONF

import mome
from mome import InvalidArgumentError, InvalidInputError, UnsupportedOptionError
from mome.layers import MoE, Router, Routing, SparseMoE, TopKRouter, update_expert_biases
from mome.layers import losses as L
from mome.layers.experts import Experts

TOL = dict(atol=1e-5, rtol=1e-5)


def _load_cv(layer: MoE) -> float:
    load = mome.routing_stats(layer)[""]["expert_load"]
    return float(load.std(unbiased=False) / load.mean())


# ----------------------------------------------------------------------------- fine-grained segmentation
def test_fine_grained_layer_has_m_times_the_experts_of_1_over_m_width():
    base = SparseMoE(16, 32, 4, 2, num_shared_experts=1)
    fine = SparseMoE(16, 32, 4, 2, fine_grained=4, num_shared_experts=1)
    assert (fine.num_experts, fine.experts.hidden_dim, fine.router.top_k) == (16, 8, 8)
    assert fine.shared_experts.fc1.out_features == 8  # one shared expert of the fine-grained width
    # the same expert parameters in all, and the same active expert width per token (k H = m k H / m)
    routed = sum(p.numel() for p in fine.experts.parameters()) - fine.experts.b_out.numel()
    assert routed == sum(p.numel() for p in base.experts.parameters()) - base.experts.b_out.numel()
    assert fine.router.top_k * fine.experts.hidden_dim == base.router.top_k * base.experts.hidden_dim
    fine(torch.randn(2, 5, 16)).sum().backward()
    with pytest.raises(InvalidArgumentError, match="fine_grained must be a divisor of hidden_dim=32"):
        SparseMoE(16, 32, 4, 2, fine_grained=3)
    with pytest.raises(UnsupportedOptionError, match="fine_grained"):
        SparseMoE(16, 32, 4, 2, router="expert_choice", fine_grained=2)


class _OneCopy(Router):
    """Every token to the ``m`` segments of copy ``copy``, each with weight 1."""

    def __init__(self, num_experts: int, segments: int, copy: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, segments
        self.register_buffer("chosen", torch.arange(segments) + copy * segments, persistent=False)

    def forward(self, x, modality_ids=None, token_ids=None) -> Routing:
        index = self.chosen.expand(x.shape[0], -1)
        ones = torch.ones(index.shape, dtype=x.dtype)
        probs = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype).scatter(1, index, 1.0 / self.top_k)
        return Routing(index, ones, torch.zeros_like(index, dtype=torch.bool), probs)


@pytest.mark.parametrize("dense", [Mlp(16, 24), SwiGLU(16, 24)], ids=["mlp", "swiglu"])
@pytest.mark.parametrize("dispatch", ["sorted", "buffers"])
def test_upcycled_segments_of_one_copy_reproduce_the_dense_ffn(dense, dispatch):
    dense = copy.deepcopy(dense).double()
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_()  # non-zero biases too
    copies, segments = 3, 4
    experts = Experts.from_dense(dense, copies, fine_grained=segments)
    assert (experts.num_experts, experts.hidden_dim) == (12, 6)
    # expert c m + s holds the hidden units [6 s, 6 s + 6) of the dense FFN (and 1/m of its output bias)
    fc1 = dense.fc1.weight if isinstance(dense, Mlp) else dense.fc1_g.weight
    torch.testing.assert_close(experts.w_in[2 * segments + 1, :6], fc1[6:12], rtol=0, atol=0)
    torch.testing.assert_close(experts.b_out[5], dense.fc2.bias / segments, rtol=0, atol=0)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    for chosen in range(copies):
        layer = MoE.from_dense(
            dense, copies, router=_OneCopy(12, segments, chosen), fine_grained=segments, capacity_factor=12.0
        )
        layer.dispatch = dispatch
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-12, atol=1e-12)
    default = MoE.from_dense(dense, copies, top_k=2, fine_grained=segments)
    assert (default.num_experts, default.router.top_k) == (12, 8)
    with pytest.raises(InvalidArgumentError, match="fine_grained must be a divisor of the dense FFN's hidden width"):
        Experts.from_dense(dense, copies, fine_grained=5)


def _segment_sum(experts: Experts, copy_index: int, segments: int, x: torch.Tensor) -> torch.Tensor:
    """Sum of the outputs of copy ``copy_index``'s ``segments`` experts on tokens ``x [T, D]``."""
    buffers = x.unsqueeze(0).expand(experts.num_experts, *x.shape)
    return experts.forward_batched(buffers.contiguous())[copy_index * segments : (copy_index + 1) * segments].sum(0)


def test_upcycle_fine_grained_vision_and_language_models():
    """``mome.upcycle(..., fine_grained=m)`` on a timm ViT (through the dense checkpoint converter) and on a
    transformers causal LM (through ``MoE.from_dense``): each MoE layer has ``m E`` experts, top ``m k``, and the
    segments of each copy sum to the dense FFN they replace."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3).eval()
    moe = mome.upcycle(vit, num_experts=2, top_k=1, fine_grained=4)
    layer = moe.blocks[1].mlp
    assert (layer.num_experts, layer.router.top_k, layer.experts.hidden_dim) == (8, 4, 32)
    x = torch.randn(5, 32)
    for copy_index in range(2):
        torch.testing.assert_close(_segment_sum(layer.experts, copy_index, 4, x), vit.blocks[1].mlp(x), **TOL)

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    lm = LlamaForCausalLM(config).eval()
    moe_lm = mome.upcycle(lm, num_experts=2, top_k=1, fine_grained=2)
    layer = moe_lm.model.layers[0].mlp
    assert (layer.num_experts, layer.router.top_k, layer.experts.hidden_dim) == (4, 2, 16)
    torch.testing.assert_close(_segment_sum(layer.experts, 1, 2, x[:, :16]), lm.model.layers[0].mlp(x[:, :16]), **TOL)
    with pytest.raises(InvalidArgumentError, match="fine_grained"):
        mome.upcycle(lm, num_experts=2, fine_grained=0)


# ------------------------------------------------------------------------ auxiliary-loss-free balancing
def _skewed_layer(rate: float | None, top_k: int = 1, renormalize: bool = True) -> SparseMoE:
    """A layer whose router's fixed logits favour expert 0 (then 1) for every token."""
    torch.manual_seed(0)
    layer = SparseMoE(8, 16, 4, top_k, renormalize=renormalize, bias_update_rate=rate)
    with torch.no_grad():
        layer.router.proj.weight.normal_(std=0.1)
        layer.router.proj.weight[0] += 0.5
        layer.router.proj.weight[1] += 0.25
    return layer


def test_bias_update_moves_a_skewed_router_towards_uniform_load():
    layer = _skewed_layer(0.01).train()
    x = torch.randn(2, 32, 8).abs()  # positive inputs: the skew holds for every token
    cvs = []
    for _ in range(60):
        layer(x)
        cvs.append(_load_cv(layer))
        update_expert_biases(layer)
    # every token starts on expert 0 (CV sqrt(3)); sign updates of a fixed size then cycle near balance
    assert cvs[0] > 1.7 and max(cvs[-10:]) < 0.5 * cvs[0], cvs
    assert sum(cvs[-10:]) < 0.4 * 10 * cvs[0], cvs
    assert layer.router.expert_bias[0] < 0 < layer.router.expert_bias[3]  # the favoured expert is pushed down


def test_bias_selects_only_and_gets_no_gradient():
    """Gates are the unbiased affinities: a uniform bias changes nothing (it would change biased gates), a skewed
    bias changes the selection but each chosen expert's weight stays its unbiased probability; and the router's
    gradients with the bias equal those without it."""
    x = torch.randn(2, 16, 8)
    plain = _skewed_layer(None, top_k=2, renormalize=False)
    shifted = _skewed_layer(0.001, top_k=2, renormalize=False)
    shifted.router.expert_bias.fill_(0.3)
    outs, grads = [], []
    for layer in (plain, shifted):
        out = layer(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append([p.grad for p in layer.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for with_bias, without in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(with_bias, without, rtol=0, atol=0)
    assert "router.expert_bias" not in dict(shifted.named_parameters())
    assert not shifted.router.expert_bias.requires_grad

    router = _skewed_layer(0.001).router
    router.expert_bias.copy_(torch.tensor([-1.0, -1.0, 0.0, 0.0]))  # experts 0 and 1 can no longer win
    tokens = x.reshape(-1, 8)
    routing = router(tokens)
    probs = router.proj(tokens).softmax(-1)
    assert set(routing.expert_index.reshape(-1).tolist()) <= {2, 3}
    torch.testing.assert_close(routing.expert_index, (probs + router.expert_bias).argmax(-1, keepdim=True))
    torch.testing.assert_close(routing.combine_weights, torch.ones_like(routing.combine_weights))  # renormalised
    unnormalised = TopKRouter(8, 4, 2, bias_update_rate=0.001)
    unnormalised.load_state_dict(router.state_dict())
    routing = unnormalised(tokens)
    torch.testing.assert_close(routing.combine_weights, probs.gather(-1, routing.expert_index))


def test_bias_update_rule_by_hand_training_only_and_saved():
    layer = SparseMoE(4, 8, 4, 2, bias_update_rate=0.5)
    router = layer.router
    # 3 tokens choosing (0, 1), (0, 2), (0, 1): loads [3, 2, 1, 0], mean 1.5 -> sign [-1, -1, +1, +1]
    router.record_load(torch.tensor([[0, 1], [0, 2], [0, 1]]))
    update_expert_biases(layer)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.5, -0.5, 0.5, 0.5]))
    assert int(router.expert_load.sum()) == 0
    layer.eval()(torch.randn(3, 5, 4))  # evaluation counts nothing: the update leaves the bias as it was
    update_expert_biases(layer)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.5, -0.5, 0.5, 0.5]))
    layer.train()(torch.randn(3, 5, 4))
    assert int(router.expert_load.sum()) == 3 * 5 * 2  # each training forward pass adds its T k selections
    state = layer.state_dict()
    assert "router.expert_bias" in state and "router.expert_load" not in state
    restored = SparseMoE(4, 8, 4, 2, bias_update_rate=0.5)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.router.expert_bias, router.expert_bias)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(bias_update_rate=0.0), InvalidArgumentError, "bias_update_rate must be a finite number > 0"),
        (dict(bias_update_rate=1e-3, router="expert_choice"), UnsupportedOptionError, "bias_update_rate"),
        (dict(bias_update_rate=1e-3, router="hash"), UnsupportedOptionError, "bias_update_rate"),
        (dict(bias_update_rate=1e-3, router="noisy_top_k"), UnsupportedOptionError, "use noise_std=0"),
        (dict(num_groups=3, max_groups=1), InvalidArgumentError, "num_groups must be a divisor of num_experts=8"),
        (dict(num_groups=4), InvalidArgumentError, "max_groups must be set together with num_groups"),
        (dict(max_groups=1), InvalidArgumentError, "num_groups must be set together with max_groups"),
        (dict(num_groups=4, max_groups=5), InvalidArgumentError, r"max_groups must be an integer in \[1, num_gro"),
        (dict(num_groups=8, max_groups=1), InvalidArgumentError, "max_groups must be large enough"),
        (dict(num_groups=4, max_groups=2, router="hash"), UnsupportedOptionError, "num_groups"),
        (dict(num_groups=4, max_groups=2, noise_std=1.0), UnsupportedOptionError, "max_groups"),
        (
            dict(num_groups=4, max_groups=2, modality_experts=[[0, 1], [2, 3]]),
            UnsupportedOptionError,
            "max_groups",
        ),
    ],
)
def test_contradicting_options_are_typed_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparseMoE(8, 16, 8, 2, **kwargs)


# ----------------------------------------------------------------------------- sequence-wise balance loss
def test_sequence_balance_loss_by_hand():
    # E = 3, K = 1, T = 2. Sequence 0: tokens -> experts 0 and 1: f = 3/2 [1, 1, 0], P = [0.3, 0.45, 0.25],
    # L_0 = 1.5 * 0.3 + 1.5 * 0.45 = 1.125. Sequence 1 (affinities summing to 2, normalised to [0.2, 0.2, 0.6]):
    # both tokens -> expert 2: f = [0, 0, 3], P = [0.2, 0.2, 0.6], L_1 = 1.8. Mean over sequences: 1.4625.
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], [[0.4, 0.4, 1.2], [0.4, 0.4, 1.2]]])
    index = torch.tensor([[[0], [1]], [[2], [2]]])
    torch.testing.assert_close(L.sequence_balance_loss(probs, index), torch.tensor(1.4625))
    uniform = torch.full((2, 6, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2]]).expand(2, 6, 2)
    torch.testing.assert_close(L.sequence_balance_loss(uniform, balanced), torch.tensor(1.0))


def test_sequence_balance_in_the_layer_is_per_sequence():
    layer = SparseMoE(8, 16, 4, 2, aux_loss_weights={"sequence_balance": 0.5})
    x = torch.randn(3, 6, 8)
    layer(x)
    routing = layer.router(x.reshape(-1, 8))
    expected = 0.5 * L.sequence_balance_loss(routing.router_probs.view(3, 6, 4), routing.expert_index.view(3, 6, 2))
    torch.testing.assert_close(mome.aux_losses(layer)["sequence_balance"], expected)
    # per sequence, not over the whole batch: the same tokens as one sequence give another value
    pooled = L.sequence_balance_loss(routing.router_probs.view(1, 18, 4), routing.expert_index.view(1, 18, 2))
    assert not torch.allclose(0.5 * pooled, expected)
    with pytest.raises(InvalidInputError, match="per sequence"):
        layer(torch.randn(6, 8))
    with pytest.raises(UnsupportedOptionError, match="sequence_balance"):
        SparseMoE(8, 16, 4, 2, router="expert_choice", aux_loss_weights={"sequence_balance": 0.1})


# ------------------------------------------------------------------------------- device-limited routing
def test_device_limited_routing_keeps_each_token_within_max_groups():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    limited = TopKRouter(16, 8, 3, num_groups=4, max_groups=2)
    free = TopKRouter(16, 8, 3)
    free.load_state_dict(limited.state_dict())
    groups_used = (limited(x).expert_index // 2).sort(-1).values.diff(dim=-1).ne(0).sum(-1) + 1
    assert int(groups_used.max()) <= 2
    free_groups = (free(x).expert_index // 2).sort(-1).values.diff(dim=-1).ne(0).sum(-1) + 1
    assert int(free_groups.max()) == 3  # without the limit some tokens do spread over 3 groups


def test_device_limited_routing_by_hand():
    # E = 6 in G = 3 groups of 2, k = 2: a group's score is the sum of its top ceil(k / M) affinities.
    probs = torch.tensor([0.30, 0.05, 0.25, 0.20, 0.15, 0.05])
    router = TopKRouter(6, 6, 2, num_groups=3, max_groups=1)
    with torch.no_grad():
        router.proj.weight.zero_()
        router.proj.weight[:, 0] = probs.log()  # the token [1, 0, ..., 0] has logits log p, affinities p
    token = torch.eye(6)[:1]
    # M = 1: group sums of the top 2: [0.35, 0.45, 0.20] -> group 1 alone: experts 2, 3 (expert 0, the best, is out)
    routing = router(token)
    assert routing.expert_index.tolist() == [[2, 3]]
    torch.testing.assert_close(routing.combine_weights, torch.tensor([[0.25, 0.20]]))
    # M = 2: top ceil(2 / 2) = 1 per group: [0.30, 0.25, 0.15] -> groups 0 and 1: experts 0, 2
    router.max_groups = 2
    assert router(token).expert_index.tolist() == [[0, 2]]


# --------------------------------------------------------------- dispatch paths, compile, models, recipe
def _deepseek_layer(dispatch: str, capacity_factor: float | None) -> SparseMoE:
    torch.manual_seed(0)
    layer = SparseMoE(
        16,
        32,
        4,
        2,
        fine_grained=2,
        num_shared_experts=1,
        renormalize=True,
        bias_update_rate=0.001,
        num_groups=4,
        max_groups=2,
        dispatch=dispatch,
        capacity_factor=capacity_factor,
        aux_loss_weights={"sequence_balance": 0.01},
    )
    layer.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, 8))
    return layer


@pytest.mark.parametrize("capacity_factor", [1.0, 8.0])
def test_sorted_and_buffers_dispatch_agree_forward_and_backward(capacity_factor):
    x = torch.randn(2, 12, 16)
    results = []
    for dispatch in ("sorted", "buffers"):
        layer = _deepseek_layer(dispatch, capacity_factor).train()
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out.square().sum() + sum(mome.aux_losses(layer).values())).backward()
        results.append((out, xi.grad, [p.grad for p in layer.parameters()], layer.router.expert_load.clone()))
    (out_s, gx_s, gp_s, load_s), (out_b, gx_b, gp_b, load_b) = results
    torch.testing.assert_close(out_b, out_s, **TOL)
    torch.testing.assert_close(gx_b, gx_s, **TOL)
    for got, expected in zip(gp_b, gp_s, strict=True):
        torch.testing.assert_close(got, expected, **TOL)
    assert torch.equal(load_b, load_s)
    if capacity_factor == 8.0:  # no drops: the sorted path's dropless plan agrees too
        dropless = _deepseek_layer("sorted", None).train()
        torch.testing.assert_close(dropless(x), out_s, **TOL)


def test_layer_compiles_fullgraph_and_does_not_sync(monkeypatch):
    import test_dispatch_compile as compile_tests

    monkeypatch.setitem(compile_tests.LAYERS, "deepseek", (lambda: _deepseek_layer("sorted", None), ()))
    compile_tests.check_layer_compiles("deepseek", "aot_eager")
    compile_tests.test_layer_forward_backward_does_not_sync("deepseek")


def test_vmoe_tiny_with_deepseek_options_runs_forward_backward():
    options = dict(
        fine_grained=2,
        num_shared_experts=1,
        renormalize=True,
        bias_update_rate=0.001,
        num_groups=2,
        max_groups=1,
        capacity_factor=None,
        aux_loss_weights={"sequence_balance": 0.001},
    )
    model = mome.create_model("vmoe_tiny_patch8_e4", router="top_k", moe_kwargs=options).train()
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert layers and all(m.num_experts == 8 and m.router.top_k == 4 for m in layers)
    loss = model(torch.randn(2, 3, 32, 32)).square().mean() + sum(mome.aux_losses(model).values())
    loss.backward()
    assert all(m.router.proj.weight.grad is not None for m in layers)
    assert update_expert_biases(model) == len(layers)
    assert all(m.router.expert_bias.abs().max() == 0.001 for m in layers)


def test_deepseek_recipe_builds_the_options():
    recipe = OmegaConf.to_container(OmegaConf.load(CONF / "moe" / "deepseek.yaml"))["model"]
    model = mome.create_model("vmoe_tiny_patch8_e4", **recipe)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert layers and all(isinstance(m.shared_experts, nn.Module) for m in layers)
    assert all(m.fine_grained == 2 and m.router.bias_update_rate == 0.001 for m in layers)
    assert all(m.aux_loss_weights == {"sequence_balance": 0.0001} for m in layers)


@pytest.mark.slow  # ~20 s: a Lightning run of 4 micro-batches
def test_training_updates_the_biases_once_per_optimizer_step(tmp_path, monkeypatch):
    """``mome-train experiment=vmoe_digits moe=deepseek`` with gradient accumulation: each router's bias is updated
    once per optimizer step, from the loads of all the step's micro-batches (Lightning's
    ``on_before_optimizer_step``)."""
    from train_helpers import compose_train

    from mome.cli.train import train

    updates = []
    original = TopKRouter.update_bias
    monkeypatch.setattr(
        TopKRouter, "update_bias", lambda self: updates.append(int(self.expert_load.sum())) or original(self)
    )
    overrides = ["experiment=vmoe_digits", "moe=deepseek", "trainer.fast_dev_run=4", "logger=csv"]
    overrides += ["trainer.accumulate_grad_batches=2", "data.batch_size=4"]
    _, objects = train(compose_train(tmp_path, overrides))
    layers = [m for m in objects["task"].model.modules() if isinstance(m, MoE)]
    tokens_per_step = 2 * 4 * 17 * 4  # micro-batches x images x tokens (16 patches + CLS) x top m k
    assert updates == [tokens_per_step] * (2 * len(layers)), updates  # 2 optimizer steps, every layer
    for layer in layers:
        bias = layer.router.expert_bias
        assert bias.abs().max() > 0 and set((bias.abs() / 0.001).round().tolist()) <= {0.0, 1.0, 2.0}
