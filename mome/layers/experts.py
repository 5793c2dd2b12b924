"""Stacked expert FFNs and the dispatch paths that feed them.

The weights of ``E`` FFNs live in stacked tensors in ``nn.Linear`` (out, in) layout: ``w_in [E, H, D]``
(``[E, 2H, D]`` for gated experts: gate rows then up rows) and ``w_out [E, D, H]``, as transformers v5
stores ``gate_up_proj``/``down_proj``. V-MoE's ``Moe/Mlp/Dense_{0,1}/kernel`` (``[E, D, H]``, ``[E, H, D]``)
are the transposes. This layout measured 15-35% faster in the forward pass of the grouped matmul on
CPU than the (in, out) one.
Two dispatch paths compute the same function:

- ``"sorted"`` (dropless-capable): assignments sorted by expert, one grouped matmul per projection
  (``torch._grouped_mm``), results scattered back with ``index_add``.
- ``"buffers"``: tokens copied into per-expert capacity buffers ``[E, C, D]``, one ``bmm`` per
  projection (GShard / V-MoE style; needs a capacity).

Shapes: ``T`` tokens, ``D`` width, ``H`` hidden width, ``E`` experts, ``k`` choices, ``C`` capacity,
``R`` rows computed by the sorted path.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._checks import check_choice, check_int
from .._errors import InvalidArgumentError
from .dispatch import DispatchPlan
from .routers import Routing

__all__ = [
    "Dispatch",
    "Experts",
    "dense",
    "given_or_new_experts",
    "is_quantized",
    "resolve_dispatch_dtype",
    "round_through",
    "segment_dense",
]

Dispatch = Literal["sorted", "buffers"]

_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dispatch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a torch floating dtype, or its name (``"bfloat16"``, ``"float16"``, ``"float32"``) -> dtype."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise InvalidArgumentError(
        "dispatch_dtype", f"None, a floating torch dtype or one of {sorted(_DTYPE_NAMES)}", dtype
    )


def is_quantized(weight: Tensor) -> bool:
    """Whether ``weight`` is a quantized tensor subclass (torchao's ``TorchAOBaseTensor`` protocol, which
    :func:`mome.quantize` puts in place of float weights), told without importing torchao."""
    return hasattr(type(weight), "tensor_data_names") and hasattr(weight, "dequantize")


def dense(weight: Tensor) -> Tensor:
    """``weight`` as a float tensor: a quantized one dequantized (``w = scale * (q - zero)``), a float one as is."""
    return weight.dequantize() if is_quantized(weight) else weight


def round_through(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``x`` rounded to ``dtype`` and cast back (the data that crosses a bf16 dispatch); as is when None."""
    if dtype is None or x.dtype == dtype or not x.is_floating_point():
        return x
    return x.to(dtype).to(x.dtype)


def _grouped_mm_ok(rows: Tensor, weight: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` accepts these operands (dtype, 16-byte aligned strides), in the forward pass and
    in the backward pass, whose gradient rows are ``weight.shape[1]`` (the output width) long."""
    if rows.dtype not in (torch.float32, torch.bfloat16):
        return False
    if weight.dtype != rows.dtype:
        return False
    size = rows.element_size()
    strides = (rows.stride(0), weight.stride(0), weight.stride(1), weight.shape[1])
    return all(stride * size % 16 == 0 for stride in strides) and rows.shape[0] > 0


_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._grouped_mm`` (``torch.utils.flop_counter`` has no formula for it, so the sorted dispatch's
    experts counted 0): ``2 x (output elements) x (contraction length)``, where a 2-D x 2-D product splits its
    contraction over the ``G`` output groups (the weight gradient: ``[out, R] x [R, in] -> [G, out, in]``)."""
    import math

    elements = math.prod(out_shape)
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * (elements // out_shape[0]) * a_shape[-1]
    return 2 * elements * a_shape[-1]


def _register_grouped_mm_flops() -> None:
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is not None and op.default not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(op)(_grouped_mm_flops)


_register_grouped_mm_flops()


def _grouped_linear_eager(rows: Tensor, weight: Tensor, group_ends: Tensor) -> Tensor:
    return _GROUPED_MM(rows, weight.transpose(1, 2), offs=group_ends)  # [R, in] x [G, in, out] -> [R, out]


def _grouped_linear_backward_eager(
    rows: Tensor, weight: Tensor, group_ends: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor]:
    grad_rows = _GROUPED_MM(grad, weight, offs=group_ends)  # [R, out] x [G, out, in] -> [R, in]
    grad_weight = _GROUPED_MM(grad.t(), rows, offs=group_ends)  # [out, R] x [R, in] -> [G, out, in]
    return grad_rows, grad_weight


# torch.compile only traces torch's grouped matmul for bf16/fp16; for fp32 it calls it through an opaque
# custom op (eager inside, with its own backward), so compiled graphs of every dtype stay whole.
@torch.library.custom_op("mome::grouped_linear", mutates_args=())
def _grouped_linear_op(rows: Tensor, weight: Tensor, group_ends: Tensor) -> Tensor:
    return _grouped_linear_eager(rows, weight, group_ends)


@_grouped_linear_op.register_fake
def _(rows, weight, group_ends):
    return rows.new_empty(rows.shape[0], weight.shape[1])


@torch.library.custom_op("mome::grouped_linear_backward", mutates_args=())
def _grouped_linear_backward_op(
    rows: Tensor, weight: Tensor, group_ends: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor]:
    return _grouped_linear_backward_eager(rows, weight, group_ends, grad)


@_grouped_linear_backward_op.register_fake
def _(rows, weight, group_ends, grad):
    return torch.empty_like(rows), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    rows, weight, group_ends = inputs
    ctx.save_for_backward(rows, weight, group_ends)


def _backward(ctx, grad):
    rows, weight, group_ends = ctx.saved_tensors
    grad_rows, grad_weight = _grouped_linear_backward_op(rows, weight, group_ends, grad.contiguous())
    return grad_rows, grad_weight, None


_grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_matmul(rows: Tensor, weight: Tensor, group_ends: Tensor) -> Tensor:
    """``out[r] = rows[r] @ weight[g(r)].T`` (``F.linear`` per group), where row ``r`` belongs to group
    ``g`` iff it lies in ``[group_ends[g-1], group_ends[g])``; ``group_ends[-1]`` must equal ``len(rows)``.

    ``rows [R, in]``, ``weight [G, out, in]`` -> ``[R, out]``. Uses ``torch.nn.functional.grouped_mm``
    (one kernel, no per-expert autograd nodes). Shapes it cannot take (widths not 16-byte aligned,
    other dtypes) fall back to one ``mm`` per group; that path synchronises with the host to split
    the rows and exists only for such shapes.
    """
    if _GROUPED_MM is not None and _grouped_mm_ok(rows, weight):
        group_ends = group_ends.to(torch.int32)
        if torch.compiler.is_compiling() and rows.dtype == torch.float32:
            return _grouped_linear_op(rows, weight, group_ends)
        return _grouped_linear_eager(rows, weight, group_ends)
    weight_t = weight.transpose(1, 2)  # [G, in, out] view
    sizes = torch.diff(group_ends, prepend=group_ends.new_zeros(1)).tolist()
    chunks = [chunk @ w for chunk, w in zip(rows.split(sizes), weight_t.unbind(0))]
    return torch.cat(chunks)


#: Rows per expert, on average, from which the sorted dispatch runs :class:`_PerExpertFFN` on CPU.
PER_EXPERT_MIN_ROWS = 256


def use_per_expert_loop(num_rows: int, num_experts: int, x: Tensor) -> bool:
    """Whether the sorted dispatch computes expert by expert (:class:`_PerExpertFFN`) rather than by grouped
    matmul: for inputs ``x`` on CPU, eager (not compiling, no autocast), and at least :data:`PER_EXPERT_MIN_ROWS` rows
    per expert on average (``R >= 256 E``, a rule on the shape alone: deciding reads no device value). The caller
    also needs float weights of ``x``'s dtype (:func:`_same_dtype`).

    Each expert's gather, FFN and weighted scatter then run back to back while its rows are in cache; the grouped
    matmul finishes every expert's first projection before any activation. ``python tools/bench.py --only layers
    --shapes 4096:8:2`` compares the two (its "grouped matmul only" row, docs/performance.md); below the threshold the
    grouped matmul's single call wins.
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    return num_rows >= PER_EXPERT_MIN_ROWS * num_experts


def _same_dtype(x: Tensor, *weights: Tensor) -> bool:
    return all(weight.dtype == x.dtype for weight in weights)


#: At most this many assignments (tokens x k) take :meth:`Experts.forward_few` (decoding a few sequences).
FEW_TOKEN_ROWS = 8


def use_few_token_path(tokens: Tensor, routing: Routing) -> bool:
    """Whether :meth:`Experts.forward_few` computes the assignments one by one: on CPU, eager, without autograd
    (inference) and for 1 to :data:`FEW_TOKEN_ROWS` assignments ``T k``, a rule on the shape alone.

    At batch 1 a decoding step routes one token per layer; there the sorted path's sort, group sizes and grouped
    matmul over all ``E`` experts are fixed costs next to the two matrix-vector products of each of the ``k`` experts.
    """
    if tokens.device.type != "cpu" or torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    return 0 < routing.expert_index.numel() <= FEW_TOKEN_ROWS  # no tokens: the sorted path's empty output


class _PerExpertFFN(torch.autograd.Function):
    """The experts one at a time, forward and backward: for the rows ``r`` of each expert ``e``,
    ``y[r] = act(x[r] W_in[e]^T + b_in[e]) W_out[e]^T + b_out[e]``.

    Two forms: ``row_token is None``, where ``x`` is ``tokens`` (rows already sorted by expert) and ``y`` is the
    output; or the whole dispatch, where row ``r`` is token ``row_token[r]`` gathered per expert and the output is
    ``out[t] = sum_{r: row_token[r] = t} row_weight[r] y[r]``, so the ``[R, D]`` gathered rows and weighted outputs
    are never materialised for the whole layer.

    A CPU path (see :func:`use_per_expert_loop`): the host knows the group sizes at no cost there, and running each
    expert's gather, projections, activation and weighted scatter back to back keeps its rows in cache, where the
    grouped matmul writes the whole ``[R, H]`` hidden tensor before activating it. The backward writes each
    expert's weight gradient straight into its slice of one ``[E, out, in]`` tensor, in the parameter's layout,
    and recomputes the activation from the saved pre-activation (it saves the ``[R, H']`` pre-activation, and the
    ``[R, D]`` unweighted outputs for the weights' gradient).
    """

    @staticmethod
    def forward(ctx, tokens, row_token, row_weight, w_in, b_in, w_out, b_out, sizes: list[int], activate, keep: bool):
        num_rows = tokens.shape[0] if row_token is None else row_token.shape[0]
        # keep: whether a backward will run (autograd on and an input that needs a gradient); inference keeps
        # nothing, each expert's buffers are temporaries
        hidden = tokens.new_empty(num_rows, w_in.shape[1]) if keep else None  # [R, H'] pre-activation
        # [R, D] unweighted outputs: saved for the weights' gradient, or the output itself in the rows form
        expert_out = tokens.new_empty(num_rows, w_out.shape[1]) if keep or row_token is None else None
        out = expert_out if row_token is None else torch.zeros_like(tokens)  # [R, D] or [T, D]
        start = 0
        for expert, count in enumerate(sizes):
            if count == 0:
                continue
            stop = start + count
            rows = tokens[start:stop] if row_token is None else tokens.index_select(0, row_token[start:stop])
            pre = rows.new_empty(count, w_in.shape[1]) if hidden is None else hidden[start:stop]
            _linear_into(pre, rows, w_in[expert], None if b_in is None else b_in[expert])
            y = rows.new_empty(count, w_out.shape[1]) if expert_out is None else expert_out[start:stop]
            _linear_into(y, activate(pre), w_out[expert], None if b_out is None else b_out[expert])
            if row_token is not None:
                weight = row_weight[start:stop, None]
                out.index_add_(0, row_token[start:stop], y * weight if keep else y.mul_(weight))
            start = stop
        if not keep:
            return out
        ctx.save_for_backward(tokens, row_token, row_weight, w_in, w_out, hidden, expert_out)
        ctx.sizes, ctx.activate = sizes, activate
        ctx.has_bias = (b_in is not None, b_out is not None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        tokens, row_token, row_weight, w_in, w_out, hidden, expert_out = ctx.saved_tensors
        need_tokens, _, need_weight, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:7]
        grad = grad.contiguous()
        missing = any(count == 0 for count in ctx.sizes)  # an expert without rows gets a zero gradient
        new = torch.zeros_like if missing else torch.empty_like
        grad_tokens = None
        if need_tokens:
            grad_tokens = torch.empty_like(tokens) if row_token is None else torch.zeros_like(tokens)
        grad_weight = torch.empty_like(row_weight) if need_weight else None
        grad_w_in = new(w_in) if need_w_in else None
        grad_w_out = new(w_out) if need_w_out else None
        grad_b_in = tokens.new_zeros(w_in.shape[:2]) if need_b_in else None  # [E, H']
        grad_b_out = tokens.new_zeros(w_out.shape[:2]) if need_b_out else None  # [E, D]
        start = 0
        for expert, count in enumerate(ctx.sizes):
            if count == 0:
                continue
            stop = start + count
            if row_token is None:
                grad_y = grad[start:stop]  # [n, D]
            else:
                index = row_token[start:stop]
                grad_y = grad.index_select(0, index)  # dL/d(w y) of the expert's rows
                if need_weight:
                    torch.sum(grad_y * expert_out[start:stop], -1, out=grad_weight[start:stop])
                grad_y.mul_(row_weight[start:stop, None])  # dL/dy
            with torch.enable_grad():
                pre = hidden[start:stop].detach().requires_grad_(True)
                activated = ctx.activate(pre)  # [n, H]
            if need_w_out:
                torch.mm(grad_y.t(), activated.detach(), out=grad_w_out[expert])  # [D, n] x [n, H]
            if need_b_out:
                torch.sum(grad_y, 0, out=grad_b_out[expert])
            if need_tokens or need_w_in or need_b_in:
                (grad_pre,) = torch.autograd.grad(activated, pre, grad_y @ w_out[expert])  # [n, H']
                if need_w_in:
                    rows = tokens[start:stop] if row_token is None else tokens.index_select(0, index)
                    torch.mm(grad_pre.t(), rows, out=grad_w_in[expert])  # [H', n] x [n, D]
                if need_b_in:
                    torch.sum(grad_pre, 0, out=grad_b_in[expert])
                if need_tokens and row_token is None:
                    torch.mm(grad_pre, w_in[expert], out=grad_tokens[start:stop])  # [n, H'] x [H', D]
                elif need_tokens:
                    grad_tokens.index_add_(0, index, grad_pre @ w_in[expert])
            start = stop
        return grad_tokens, None, grad_weight, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None


def _needs_backward(*tensors: Tensor | None) -> bool:
    """Whether autograd will ask for a gradient of one of ``tensors`` (grad mode on and one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """``out = x @ weight^T (+ bias)``, written into ``out`` (``F.linear`` without the new tensor)."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


class _BatchedLinear(torch.autograd.Function):
    """``out[e] = x[e] @ weight[e]^T + bias[e]``, with the weight gradient made in the weight's layout.

    Autograd's ``bmm`` backward on the view ``weight.transpose(1, 2)`` returns ``dL/dW`` transposed
    (``[E, in, out]`` memory), which gradient accumulation then copies into the parameter's
    ``[E, out, in]`` layout: a strided copy of the whole expert tensor, 17% of a Soft MoE
    forward+backward (T=4096, E=8, D=512, H=2048) and most of the buffers path's backward at
    E=128, measured on 2 cores. Here ``dL/dW[e] = dL/dout[e]^T @ x[e]`` is computed directly as
    ``[E, out, in]``, like ``F.linear``'s backward does for ``mm``.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        weight_t = weight.transpose(1, 2)  # [E, in, out] view
        if bias is None:
            return torch.bmm(x, weight_t)
        return torch.baddbmm(bias.unsqueeze(1), x, weight_t)  # [E, C, out]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        # Under autocast (bf16-mixed) the forward's bmm ran in the autocast dtype while x and the weight were
        # saved in theirs, and a backward runs without autocast: compute in the gradient's dtype and return each
        # gradient in its input's dtype (no-ops without autocast).
        x, weight = ctx.saved_tensors
        dtype = grad.dtype
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad, weight.to(dtype)).to(x.dtype)  # [E, C, in]
        if ctx.needs_input_grad[1]:
            grad_weight = torch.bmm(grad.transpose(1, 2), x.to(dtype)).to(weight.dtype)  # [E, out, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(1).to(ctx.bias_dtype)  # [E, out]
        return grad_x, grad_weight, grad_bias


def batched_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` per expert on buffers: ``x [E, C, in]``, ``weight [E, out, in]``, ``bias [E, out]``
    -> ``[E, C, out]``."""
    return _BatchedLinear.apply(x, weight, bias)


class Experts(nn.Module):
    """``E`` two-layer FFNs with stacked weights: ``FFN_e(x) = act(x W_in[e] + b_in[e]) W_out[e] + b_out[e]``.

    With ``gated=True`` the first projection yields ``[gate, up]`` and ``FFN_e(x) = (act(gate) * up)
    W_out[e]`` (SwiGLU with ``act=SiLU``, Shazeer 2020, as in Mixtral and MoE-LLaVA-StableLM/Qwen).

    Args:
        num_experts: ``E``.
        dim: input/output width ``D``.
        hidden_dim: hidden width ``H`` of each expert.
        gated: GLU-style experts.
        act_layer: activation module class (``nn.GELU`` default, ``nn.SiLU`` for SwiGLU).
        bias: biases on both projections.
        dispatch: default dispatch path, ``"sorted"`` or ``"buffers"``.
        dispatch_dtype: the dtype the tokens and the expert outputs cross the dispatch in (e.g.
            ``torch.bfloat16``, vmoe's ``Bfloat16Dispatcher``): each expert's input and output are rounded
            to it and cast back, the FFN and the weighted combine run in the compute dtype. None: no rounding.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        *,
        gated: bool = False,
        act_layer: type[nn.Module] | nn.Module = nn.GELU,
        bias: bool = True,
        dispatch: Dispatch = "sorted",
        dispatch_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim)):
            check_int(name, value, owner=owner)
        check_choice("dispatch", dispatch, ("sorted", "buffers"), owner=owner)
        if not (isinstance(act_layer, nn.Module) or (isinstance(act_layer, type) and issubclass(act_layer, nn.Module))):
            raise InvalidArgumentError("act_layer", "an nn.Module class or instance", act_layer, owner)
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.gated = gated
        self.dispatch = dispatch
        self.dispatch_dtype = resolve_dispatch_dtype(dispatch_dtype)
        in_width = 2 * hidden_dim if gated else hidden_dim
        self.w_in = nn.Parameter(torch.empty(num_experts, in_width, dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b_in = nn.Parameter(torch.zeros(num_experts, in_width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.act = act_layer if isinstance(act_layer, nn.Module) else act_layer()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like an ``nn.Linear`` (uniform, bound ``1/sqrt(fan_in)``)."""
        for weight, bias in ((self.w_in, self.b_in), (self.w_out, self.b_out)):
            bound = 1.0 / math.sqrt(weight.shape[2])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
            f"gated={self.gated}, bias={self.b_in is not None}, dispatch={self.dispatch!r}"
            + (f", dispatch_dtype={self.dispatch_dtype}" if self.dispatch_dtype is not None else "")
        )

    def activate(self, hidden: Tensor) -> Tensor:
        """The activation between the projections: ``act(hidden)``, or ``act(gate) * up`` for gated experts."""
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(hidden)

    def dense_weights(self) -> tuple[Tensor, Tensor]:
        """``(w_in [E, H', D], w_out [E, D, H])`` as float tensors: after :func:`mome.quantize` the stacked weights
        are torchao tensor subclasses (int8 per row, or packed int4 per group), dequantized here for each forward
        (weight-only quantization: the matmuls run in the activations' float dtype); float weights as they are."""
        return dense(self.w_in), dense(self.w_out)

    # ---------------------------------------------------------------- compute on grouped tokens
    def forward_grouped(self, rows: Tensor, group_sizes: Tensor) -> Tensor:
        """FFNs on rows sorted by expert: ``rows [R, D]`` -> ``[R, D]``.

        ``group_sizes [E]`` counts the rows of each expert (``group_sizes.sum() == R``). Two computations give
        the same result: one grouped matmul per projection, or on CPU with many rows per expert
        (:func:`use_per_expert_loop`) each expert's FFN in turn.
        """
        num_rows = rows.shape[0]
        rows = round_through(rows, self.dispatch_dtype)
        w_in, w_out = self.dense_weights()
        if use_per_expert_loop(num_rows, self.num_experts, rows) and _same_dtype(rows, w_in, w_out):
            sizes = group_sizes.tolist()  # on CPU: no device to wait for
            keep = _needs_backward(rows, w_in, w_out, self.b_in, self.b_out)
            out = _PerExpertFFN.apply(rows, None, None, w_in, self.b_in, w_out, self.b_out, sizes, self.activate, keep)
            return round_through(out, self.dispatch_dtype)
        group_ends = group_sizes.cumsum(0)
        hidden = grouped_matmul(rows, w_in, group_ends)  # [R, H or 2H]
        if self.b_in is not None:  # in place: the matmul output is not saved for its backward
            hidden += self.b_in.repeat_interleave(group_sizes, dim=0, output_size=num_rows)
        out = grouped_matmul(self.activate(hidden), w_out, group_ends)  # [R, D]
        if self.b_out is not None:
            out += self.b_out.repeat_interleave(group_sizes, dim=0, output_size=num_rows)
        return round_through(out, self.dispatch_dtype)

    def forward_batched(self, buffers: Tensor) -> Tensor:
        """FFNs on per-expert buffers: ``[E, C, D]`` -> ``[E, C, D]`` (one ``bmm`` per projection).

        The per-expert loop of :meth:`forward_grouped` is not used here: the ``bmm`` already runs expert by
        expert."""
        buffers = round_through(buffers, self.dispatch_dtype)
        w_in, w_out = self.dense_weights()
        hidden = self.activate(batched_linear(buffers, w_in, self.b_in))  # [E, C, H']
        return round_through(batched_linear(hidden, w_out, self.b_out), self.dispatch_dtype)  # [E, C, D]

    def forward_slots(self, buffers: Tensor) -> Tensor:
        """Per-expert slot buffers of all ``E`` experts ``[E, C, D]`` -> ``[E, C, D]``.

        On one process this is :meth:`forward_batched`; sharded experts
        (:class:`~mome.layers.expert_parallel.ShardedExperts`) send each expert's slots to its rank.
        """
        return self.forward_batched(buffers)

    # ---------------------------------------------------------------- dispatch + combine
    #: Whether :meth:`forward_few` may serve this module (sharded experts hold only some experts).
    serves_few_tokens = True

    def forward_few(self, tokens: Tensor, routing: Routing) -> Tensor:
        """``out[t] = sum_j w[t, j] * FFN_{e[t, j]}(x[t])``, token by token (a few tokens on CPU, see
        :func:`use_few_token_path`): ``[T, D]``. Every assignment is computed; a dropped one has weight 0.

        For each token the ``k`` first projections are matrix-vector products (``addmv``), the activation runs once
        on their ``[k, H']`` stack, and each second projection is added to the output already weighted
        (``addmv(acc, W_out[e], h, alpha=w)``): a few ops per expert, where the sorted path's plan and grouped
        matmuls cost the same at one token as at hundreds.
        """
        w_in, w_out = self.dense_weights()
        b_in, b_out, dispatch_dtype = self.b_in, self.b_out, self.dispatch_dtype  # one module lookup each
        choices = routing.expert_index.tolist()  # [T][k]: read on the CPU, nothing to wait for
        weights = routing.combine_weights.to(tokens.dtype)  # [T, k]
        weight_values = weights.tolist()
        rows = []
        for token, experts in enumerate(choices):
            x = round_through(tokens[token], dispatch_dtype)  # [D]
            pre = [torch.mv(w_in[e], x) if b_in is None else torch.addmv(b_in[e], w_in[e], x) for e in experts]
            hidden = self.activate(torch.stack(pre))  # [k, H]
            if dispatch_dtype is not None:  # each expert's output crosses the dispatch rounded: weigh it after
                out = x.new_zeros(self.dim)
                for choice, expert in enumerate(experts):
                    y = F.linear(hidden[choice], w_out[expert], None if b_out is None else b_out[expert])
                    out = out + round_through(y, dispatch_dtype) * weights[token, choice]
            else:
                if b_out is None:
                    out = x.new_zeros(self.dim)
                else:  # sum_j w_j b_out[e_j]
                    out = torch.mv(b_out.index_select(0, routing.expert_index[token]).t(), weights[token])  # [D]
                for choice, expert in enumerate(experts):
                    out = torch.addmv(out, w_out[expert], hidden[choice], alpha=weight_values[token][choice])
            rows.append(out)
        return torch.stack(rows)  # [T, D]

    def forward(self, tokens: Tensor, routing: Routing, plan: DispatchPlan, dispatch: Dispatch | None = None) -> Tensor:
        """``out[t] = sum_j w[t, j] * FFN_{e[t, j]}(x[t])`` over the kept assignments: ``[T, D]``."""
        dispatch = dispatch or self.dispatch
        if dispatch == "sorted":
            return self._dispatch_sorted(tokens, routing, plan)
        if dispatch == "buffers":
            return self._dispatch_buffers(tokens, routing, plan)
        check_choice("dispatch", dispatch, ("sorted", "buffers"), owner=type(self).__name__)

    def _dispatch_sorted(self, tokens: Tensor, routing: Routing, plan: DispatchPlan) -> Tensor:
        top_k = routing.top_k
        rows = plan.order[: plan.num_rows]  # [R] assignment ids, kept ones grouped by expert first
        # Rows past the kept ones (dropped assignments, only when R > kept) are computed by the
        # last expert and weighted by 0: finite values, zero gradients, no host sync.
        group_sizes = plan.group_sizes.clone()
        group_sizes[-1] += plan.num_rows - group_sizes.sum()
        row_token = rows // top_k  # [R]
        row_weight = routing.combine_weights.reshape(-1)[rows].to(tokens.dtype)  # [R]
        if self.dispatch_dtype is None and use_per_expert_loop(plan.num_rows, self.num_experts, tokens):
            w_in, w_out = self.dense_weights()  # built here only: forward_grouped builds its own
            if _same_dtype(tokens, w_in, w_out):
                sizes = group_sizes.tolist()  # on CPU: no device to wait for
                keep = _needs_backward(tokens, row_weight, w_in, w_out, self.b_in, self.b_out)
                args = (tokens, row_token, row_weight, w_in, self.b_in, w_out, self.b_out, sizes, self.activate, keep)
                return _PerExpertFFN.apply(*args)  # gather, experts and weighted scatter, expert by expert
        expert_out = self.forward_grouped(tokens.index_select(0, row_token), group_sizes)  # [R, D]
        out = torch.zeros_like(tokens)
        return out.index_add_(0, row_token, expert_out * row_weight.unsqueeze(-1))

    def _dispatch_buffers(self, tokens: Tensor, routing: Routing, plan: DispatchPlan) -> Tensor:
        if plan.slot is None:
            expected = "a capacity for dispatch='buffers' (set capacity_factor, or use dispatch='sorted')"
            raise InvalidArgumentError("plan", expected, "a dropless plan", type(self).__name__)
        dim = tokens.shape[-1]
        slots_per_expert = plan.num_groups * plan.capacity  # G*C
        num_slots = self.num_experts * slots_per_expert
        assignment_token = torch.arange(tokens.shape[0], device=tokens.device).repeat_interleave(routing.top_k)
        # [E*G*C + 1, D]; the last row is a sink for dropped assignments.
        buffers = tokens.new_zeros(num_slots + 1, dim).index_add_(
            0, plan.slot, tokens.index_select(0, assignment_token)
        )
        expert_out = self.forward_batched(buffers[:num_slots].view(self.num_experts, slots_per_expert, dim))
        expert_out = torch.cat([expert_out.reshape(num_slots, dim), tokens.new_zeros(1, dim)])  # [E*G*C+1, D]
        weight = routing.combine_weights.reshape(-1, 1).to(tokens.dtype)  # [T*k, 1]
        out = torch.zeros_like(tokens)
        return out.index_add_(0, assignment_token, expert_out.index_select(0, plan.slot) * weight)

    # ---------------------------------------------------------------- sparse upcycling
    @classmethod
    def from_dense(
        cls, mlp: nn.Module, num_experts: int, *, dispatch: Dispatch = "sorted", fine_grained: int = 1
    ) -> Experts:
        """Sparse upcycling (Komatsuzaki et al. 2023): ``E`` copies of a dense FFN.

        Accepts timm ``Mlp``, ``GluMlp``/``SwiGLUPacked`` and ``SwiGLU``, and transformers MLPs with
        ``gate_proj/up_proj/down_proj`` (Llama, Mistral, Qwen2, StableLM) or ``fc1/fc2`` (Phi, CLIP).
        The activation module is copied, so every expert computes exactly the dense function.

        ``fine_grained=m`` (DeepSeekMoE's fine-grained segmentation, Dai et al. 2024): the dense hidden units are
        split into ``m`` segments of ``H / m`` and each segment is copied to the ``E`` copies, ``m E`` experts in
        all (:func:`segment_dense`); the ``m`` segments of one copy sum to the dense FFN.
        """
        check_int("fine_grained", fine_grained, owner="Experts.from_dense")
        w_in, b_in, w_out, b_out, act, gated = _dense_ffn_spec(mlp)
        hidden_dim = w_out.shape[1]
        if hidden_dim % fine_grained:
            expected = f"a divisor of the dense FFN's hidden width {hidden_dim}"
            raise InvalidArgumentError("fine_grained", expected, fine_grained, "Experts.from_dense")
        experts = cls(
            num_experts * fine_grained,
            w_in.shape[1],
            hidden_dim // fine_grained,
            gated=gated,
            act_layer=copy.deepcopy(act),
            bias=b_in is not None,
            dispatch=dispatch,
        ).to(w_in.dtype)  # before the copy: a float64 FFN is copied exactly
        with torch.no_grad():
            for name, value in (("w_in", w_in), ("b_in", b_in), ("w_out", w_out), ("b_out", b_out)):
                if value is not None:
                    getattr(experts, name).copy_(segment_dense(name, value, num_experts, fine_grained, gated=gated))
        return experts


def segment_dense(name: str, value: Tensor, num_copies: int, fine_grained: int = 1, *, gated: bool = False) -> Tensor:
    """A dense FFN's tensor (``name`` one of ``w_in [H', D]``, ``b_in [H']``, ``w_out [D, H]``, ``b_out [D]``, in
    nn.Linear layout) as the stacked tensor of ``num_copies * m`` experts (``m = fine_grained``).

    Expert ``c m + s`` holds segment ``s`` of copy ``c``: hidden units ``[s H/m, (s+1) H/m)`` (of the gate and of
    the up rows apart when ``gated``) and ``b_out / m``, so the ``m`` segments of a copy sum to the dense FFN
    (DeepSeekMoE's fine-grained segmentation, Dai et al. 2024). ``m = 1`` is plain sparse upcycling: a copy each.
    """
    m = fine_grained
    if name in ("w_in", "b_in"):  # the hidden axis is axis 0: [H', ...] -> [m, H'/m, ...]
        parts = value.chunk(2) if gated else (value,)
        segments = torch.cat([part.reshape(m, part.shape[0] // m, *part.shape[1:]) for part in parts], dim=1)
    elif name == "w_out":  # [D, H] -> [m, D, H/m]
        segments = value.reshape(value.shape[0], m, value.shape[1] // m).transpose(0, 1)
    elif name == "b_out":  # [D] -> [m, D]: each segment adds 1/m of the bias
        segments = (value / m).expand(m, *value.shape)
    else:
        raise InvalidArgumentError("name", "one of 'w_in', 'b_in', 'w_out', 'b_out'", name, "segment_dense")
    stacked = segments.unsqueeze(0).expand(num_copies, *segments.shape)  # [E, m, ...]
    return stacked.reshape(num_copies * m, *segments.shape[1:]).clone(memory_format=torch.contiguous_format)


def _dense_ffn_spec(mlp: nn.Module) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, nn.Module, bool]:
    """``(w_in [H', D], b_in, w_out [D, H], b_out, act, gated)`` of a dense FFN, in nn.Linear layout.

    For gated FFNs ``w_in`` is ``[gate; up]`` stacked on the output axis.
    """

    def bias_or_none(*linears: nn.Linear) -> Tensor | None:
        biases = [lin.bias for lin in linears]
        if all(b is None for b in biases):
            return None
        if any(b is None for b in biases):
            expected = "a gated FFN with biases on both input projections or neither (cannot upcycle a mix)"
            raise InvalidArgumentError("mlp", expected, type(mlp).__name__, "Experts.from_dense")
        return torch.cat([b.detach() for b in biases])

    def check_identity(*names: str) -> None:
        for name in names:
            module = getattr(mlp, name, None)
            if module is not None and not isinstance(module, (nn.Identity, nn.Dropout)):
                expected = "an FFN without an inner norm (upcycling copies plain FFNs)"
                got = f"{type(mlp).__name__}.{name} = {type(module).__name__}"
                raise InvalidArgumentError("mlp", expected, got, "Experts.from_dense")

    def out_bias(lin: nn.Linear) -> Tensor | None:
        return None if lin.bias is None else lin.bias.detach()

    name = type(mlp).__name__
    # transformers Llama/Mistral/Qwen2/StableLM: down(act(gate(x)) * up(x))
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        w_in = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
        return (
            w_in,
            bias_or_none(mlp.gate_proj, mlp.up_proj),
            mlp.down_proj.weight.detach(),
            out_bias(mlp.down_proj),
            mlp.act_fn,
            True,
        )
    # timm SwiGLU: fc2(norm(act(fc1_g(x)) * fc1_x(x)))
    if hasattr(mlp, "fc1_g") and hasattr(mlp, "fc1_x"):
        check_identity("norm")
        w_in = torch.cat([mlp.fc1_g.weight.detach(), mlp.fc1_x.weight.detach()])
        return w_in, bias_or_none(mlp.fc1_g, mlp.fc1_x), mlp.fc2.weight.detach(), out_bias(mlp.fc2), mlp.act, True
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        act = getattr(mlp, "act", None) or getattr(mlp, "activation_fn", None) or getattr(mlp, "act_fn", None)
        if act is None:
            expected = "an fc1/fc2 FFN with an activation module (act, activation_fn or act_fn)"
            raise InvalidArgumentError("mlp", expected, name, "Experts.from_dense")
        check_identity("norm")
        fc1_weight, fc1_bias = mlp.fc1.weight.detach(), out_bias(mlp.fc1)
        # timm GluMlp / SwiGLUPacked: x1, x2 = fc1(x).chunk(2); act(x2) * x1 (gate_last) or act(x1) * x2.
        if name in ("GluMlp", "SwiGLUPacked") or hasattr(mlp, "gate_last"):
            half = fc1_weight.shape[0] // 2
            first, second = slice(0, half), slice(half, None)
            gate_rows, up_rows = (second, first) if getattr(mlp, "gate_last", True) else (first, second)
            w_in = torch.cat([fc1_weight[gate_rows], fc1_weight[up_rows]])
            b_in = None if fc1_bias is None else torch.cat([fc1_bias[gate_rows], fc1_bias[up_rows]])
            return w_in, b_in, mlp.fc2.weight.detach(), out_bias(mlp.fc2), act, True
        return fc1_weight, fc1_bias, mlp.fc2.weight.detach(), out_bias(mlp.fc2), act, False
    expected = (
        "an FFN it can upcycle: fc1/fc2 (timm Mlp, Phi, CLIP), fc1_g/fc1_x/fc2 (timm SwiGLU) "
        "or gate_proj/up_proj/down_proj (Llama-style)"
    )
    raise InvalidArgumentError("mlp", expected, name, "Experts.from_dense")


def given_or_new_experts(
    experts: object,
    num_experts: int,
    dim: int,
    hidden_dim: int,
    owner: str,
    gated: bool = False,
    act_layer: type[nn.Module] = nn.GELU,
    bias: bool = True,
) -> Experts:
    """``experts`` when it is an :class:`Experts` of ``num_experts`` experts of width ``dim`` (else a typed error
    naming ``owner``), or new experts of those sizes when it is None (the layers that take prebuilt experts)."""
    if experts is None:
        return Experts(num_experts, dim, hidden_dim, gated=gated, act_layer=act_layer, bias=bias)
    if not isinstance(experts, Experts):
        raise InvalidArgumentError("experts", "a mome.layers.Experts (or None)", type(experts).__name__, owner)
    if experts.num_experts != num_experts or experts.dim != dim:
        expected = f"experts with num_experts={num_experts}, dim={dim}"
        raise InvalidArgumentError("experts", expected, f"num_experts={experts.num_experts}, dim={experts.dim}", owner)
    return experts
