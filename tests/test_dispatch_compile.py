"""The MoE dispatch paths under torch.compile, and without host-device synchronisation.

- Every MoE layer kind compiles with ``fullgraph=True`` (a graph break raises) and matches eager,
  forward and backward, within 1e-5. The default suite compiles with ``backend="aot_eager"`` (Dynamo
  plus AOTAutograd, which traces the backward too); inductor runs under ``-m slow``.
- Every model family (tiny variants) compiles and matches eager, in one graph except the families of
  ``KNOWN_BREAKS`` (breaks outside mome/layers); inside the model, each MoE layer is compiled with
  ``fullgraph=True``, so a graph break *inside* an MoE layer on the model's own inputs fails the test.
- No host-device sync inside an MoE forward: on CPU a ``TorchDispatchMode`` records every aten op that
  synchronises on an accelerator (``.item()``/``.tolist()``/``int(t)`` reach ``aten._local_scalar_dense``;
  ``nonzero``, boolean-mask indexing, ``unique``, ``repeat_interleave`` without ``output_size`` have
  data-dependent shapes) while an MoE layer runs; on CUDA, ``torch.cuda.set_sync_debug_mode("error")``
  does the same for real. ``grouped_matmul``'s per-group fallback (which reads group sizes on the
  host) must not be taken at any model's configured widths.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mome
from mome.layers import ModalityMoE, MultiwayFFN, RoutedLayer, SoftMoE, SparseMoE
from mome.layers import experts as experts_module

TOL = dict(atol=1e-5, rtol=1e-5)
FAMILIES = (
    "vmoe_tiny_patch8_e4",
    "soft_moe_vit_tiny_patch8_e8",
    "limoe_tiny_patch8_e4",
    "vlmo_tiny_patch8_32",
    "moe_llava_tiny_e4",
)
#: Graph breaks the whole-model compile meets outside mome's MoE layers (reported, not failures).
KNOWN_BREAKS = {
    # LIMoE with route_padding=False gathers the non-pad text tokens with a boolean mask (limoe.py
    # ``LIMoE._ffn``: ``h[keep]``, ``index_put((keep,), ...)``): aten.nonzero, data-dependent shape.
    "limoe_tiny_patch8_e4": "limoe.py LIMoE._ffn boolean-mask gather (aten.nonzero)",
    # transformers: output capturing's lock context manager, LLaVA's placeholder check (Tensor.item()).
    "moe_llava_tiny_e4": "transformers output_capturing lock, llava get_placeholder_mask .item()",
}
#: aten ops that read device values on the host, or whose output shape depends on them.
SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "equal",
    "is_nonzero",
    "_assert_async",
}
#: Indexing ops that turn a boolean mask into indices (a data-dependent shape) inside ATen.
BOOL_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code is cached per code object (``MoE.forward`` serves every layer): start each test clean,
    so caches and the recompile limit do not carry over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def modality_ids(batch=2, length=8):
    return torch.tensor([[0] * (length // 2) + [1] * (length - length // 2)] * batch)


# kind -> (layer factory, extra forward arguments)
LAYERS = {
    "sparse_sorted_dropless": (lambda: SparseMoE(16, 32, 4, 2), ()),
    "sparse_sorted_capacity": (lambda: SparseMoE(16, 32, 4, 2, capacity_factor=1.0), ()),
    "sparse_buffers": (lambda: SparseMoE(16, 32, 4, 2, capacity_factor=1.0, dispatch="buffers"), ()),
    "sparse_swiglu_shared": (
        lambda: SparseMoE(16, 32, 4, 2, gated=True, act_layer=torch.nn.SiLU, bias=False, num_shared_experts=1),
        (),
    ),
    "soft": (lambda: SoftMoE(16, 32, 4, 2), ()),
    "modality_moe": (lambda: ModalityMoE(16, 32, [2, 2], 1), (modality_ids(),)),
    "modality_moe_default_modality": (lambda: ModalityMoE(16, 32, [2, 2], 1, default_modality=0), ()),
    "multiway_ffn": (lambda: MultiwayFFN(16, 32), (modality_ids(),)),
}


def fwd_bwd(layer, x, extra):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x, *extra)
    out.square().sum().backward()
    return out.detach(), x.grad, [p.grad for p in layer.parameters()]


def check_layer_compiles(kind, backend):
    build, extra = LAYERS[kind]
    torch.manual_seed(0)
    layer = build().train()
    x = torch.randn(2, 8, 16)
    eager = fwd_bwd(layer, x, extra)
    compiled = fwd_bwd(torch.compile(layer, fullgraph=True, backend=backend), x, extra)
    torch.testing.assert_close(compiled[0], eager[0], **TOL)
    torch.testing.assert_close(compiled[1], eager[1], **TOL)
    for got, expected in zip(compiled[2], eager[2]):
        torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_compiles_fullgraph_and_matches_eager(kind):
    check_layer_compiles(kind, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_compiles_fullgraph_with_inductor(kind):
    check_layer_compiles(kind, "inductor")


# -- model families ----------------------------------------------------------------------------------------
def family_inputs(name, model):
    """``(args, kwargs)`` of a forward pass of a tiny model (batch 2)."""
    torch.manual_seed(1)
    if name.startswith("limoe"):
        texts = mome.get_tokenizer(name)(["a photo of a cat", "a dog"])  # padded: exercises route_padding
        return (torch.randn(2, 3, 32, 32), texts), {}
    if name.startswith("vlmo"):
        return (torch.randn(2, 3, 32, 32), torch.randint(5, 100, (2, 8))), {}
    if name.startswith("moe_llava"):
        image = [model.config.image_token_id] * model.num_image_tokens
        ids = torch.tensor([[1, *image, 5, 6, 7, 8]] * 2)
        return (), {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32)}
    return (torch.randn(2, 3, 32, 32),), {}


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "logits"):
        return out["logits"] if "logits" in out else next(v for v in out.values() if isinstance(v, torch.Tensor))
    return out[0]


def moe_layers(model):
    """The routed layers and modality FFNs of a model (the units that must compile whole)."""
    return [m for m in model.modules() if isinstance(m, (RoutedLayer, MultiwayFFN)) and not _inside_multiway(m, model)]


def _inside_multiway(module, model):
    return any(isinstance(p, MultiwayFFN) and module in list(p.modules())[1:] for p in model.modules())


class GraphCounter:
    """An aot_eager backend that counts the graphs Dynamo hands it (graph breaks = graphs - 1)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs += 1
        return aot_eager(graph_module, example_inputs)


# MoE-LLaVA's whole-model compile takes ~20 s on 2 cores: under -m slow (its MoE layers are checked below).
WHOLE_MODEL = [pytest.param(n, marks=pytest.mark.slow) if n.startswith("moe_llava") else n for n in FAMILIES]


@pytest.mark.parametrize("name", WHOLE_MODEL)
def test_model_family_compiles_and_matches_eager(name):
    torch.manual_seed(0)
    model = mome.create_model(name).eval()  # eval: no router noise, dropout off, so outputs are comparable
    args, kwargs = family_inputs(name, model)
    counter = GraphCounter()
    with torch.no_grad():
        eager = first_tensor(model(*args, **kwargs))
        compiled = first_tensor(torch.compile(model, backend=counter)(*args, **kwargs))
    torch.testing.assert_close(compiled, eager, **TOL)
    if name not in KNOWN_BREAKS:
        assert counter.graphs == 1, f"{name}: {counter.graphs - 1} graph breaks"


@pytest.mark.parametrize("name", FAMILIES)
def test_model_moe_layers_compile_fullgraph_inside_the_model(name):
    """Each MoE layer of the model compiled with fullgraph=True, run on the model's own activations
    (training mode, forward and backward): a graph break inside an MoE layer raises."""
    torch.manual_seed(0)
    model = mome.create_model(name).train()
    args, kwargs = family_inputs(name, model)
    layers = moe_layers(model)
    assert layers, f"{name} has no MoE layer"
    for layer in layers:
        layer.compile(fullgraph=True, backend="aot_eager")
    out = first_tensor(model(*args, **kwargs))
    (out.float().square().mean() + sum(mome.aux_losses(model).values())).backward()
    assert all(any(p.grad is not None for p in layer.parameters()) for layer in layers)  # backward went through


# -- host-device synchronisation --------------------------------------------------------------------------
#: Host reads that only happen on CPU tensors (skipped on accelerators): mome's range check of modality ids
#: (by function) and ATen's ``one_hot`` index check (by source line; CUDA relies on device asserts there).
CPU_ONLY_FUNCTIONS = ("check_modality_ids",)
CPU_ONLY_LINES = ("one_hot(",)


class SyncRecorder(TorchDispatchMode):
    """Records, while ``active``, the aten ops of ``SYNC_OPS`` (and ``repeat_interleave`` without
    ``output_size``) with the source line that issued them, except the CPU-only checks."""

    def __init__(self):
        super().__init__()
        self.active = True
        self.found: list[str] = []

    def __enter__(self):
        # ``Tensor.tolist`` reads CPU memory without an aten op: record it by wrapping the method.
        self._tolist = torch.Tensor.tolist
        recorder, original = self, self._tolist

        def tolist(tensor):
            if recorder.active:
                recorder.record("Tensor.tolist", "")
            return original(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def record(self, what: str, exempt_line_patterns=CPU_ONLY_LINES) -> None:
        frame = next(
            (
                f
                for f in inspect.stack(context=1)[2:]
                if "/torch/" not in f.filename and f.function not in ("__torch_dispatch__", "tolist")
            ),
            None,
        )
        line = (frame.code_context or [""])[0].strip() if frame else ""
        exempt = frame is not None and frame.function in CPU_ONLY_FUNCTIONS
        if not exempt and not any(check in line for check in exempt_line_patterns):
            where = f"{frame.filename.split('/')[-1]}:{frame.lineno} {line}" if frame else "?"
            self.found.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        syncs = (
            name in SYNC_OPS
            or (name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3)
            or (name in BOOL_INDEX_OPS and any(i is not None and i.dtype == torch.bool for i in args[1]))
        )
        if self.active and syncs:
            self.record(str(func))
        return func(*args, **kwargs)


def only_inside(model, recorder):
    """Turn the recorder on only while a routed layer runs its forward."""
    handles = []
    for layer in moe_layers(model):
        handles.append(layer.register_forward_pre_hook(lambda *_: setattr(recorder, "active", True)))
        handles.append(layer.register_forward_hook(lambda *_: setattr(recorder, "active", False)))
    recorder.active = False
    return handles


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_forward_backward_does_not_sync(kind):
    build, extra = LAYERS[kind]
    layer = build().train()
    with SyncRecorder() as recorder:
        fwd_bwd(layer, torch.randn(2, 8, 16), extra)
    assert not recorder.found, recorder.found


@pytest.mark.parametrize("name", FAMILIES)
def test_model_moe_layers_do_not_sync_nor_fall_back(name, monkeypatch):
    calls = []
    check = experts_module._grouped_mm_ok
    monkeypatch.setattr(experts_module, "_grouped_mm_ok", lambda *a: calls.append(check(*a)) or calls[-1])
    model = mome.create_model(name).train()
    args, kwargs = family_inputs(name, model)
    with SyncRecorder() as recorder:
        handles = only_inside(model, recorder)
        first_tensor(model(*args, **kwargs)).float().square().mean().backward()
    for handle in handles:
        handle.remove()
    assert not recorder.found, recorder.found
    assert all(calls), f"{name}: grouped_matmul fell back to the per-group (host-synchronising) path"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_forward_does_not_sync_on_cuda(kind):
    build, extra = LAYERS[kind]
    layer = build().cuda().train()
    x, extra = torch.randn(2, 8, 16, device="cuda"), [e.cuda() for e in extra]
    layer(x, *extra)  # warm-up (lazy initialisation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x, *extra)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_configured_widths_take_the_grouped_mm_path():
    """grouped_mm needs 16-byte aligned rows: D and H multiples of 4 (fp32) or 8 (bf16) in every
    registered model's experts (built on meta), so the per-group fallback, which reads the group sizes
    on the host, is never taken at configured widths in fp32/bf16 (fp16 always takes it)."""
    from mome.models.hf_moe_vlm import RELEASED  # transformers' models: no mome experts, architecture on the Hub

    checked = set()
    for name in mome.list_models():
        if name in RELEASED:
            continue
        with torch.device("meta"):
            model = mome.create_model(name)
        for module in model.modules():
            if isinstance(module, experts_module.Experts):
                widths = (module.dim, module.w_in.shape[1], module.hidden_dim)
                assert all(width % 8 == 0 for width in widths), (name, widths)
                checked.add(name)
    assert len(checked) >= 20


def test_sync_recorder_sees_host_reads():
    """The detector's positive control: grouped_matmul's fallback (widths not 16-byte aligned) and a
    boolean-mask gather are reported."""
    rows, weight = torch.randn(5, 3), torch.randn(2, 4, 3)
    with SyncRecorder() as recorder:
        experts_module.grouped_matmul(rows, weight, torch.tensor([2, 5]))
    assert recorder.found and "tolist" in recorder.found[0]
    with SyncRecorder() as recorder:
        rows[rows[:, 0] > 0]
    assert any("aten.index" in found for found in recorder.found)
