"""Quantized layers: every GEMM operand quantized per a PrecisionPolicy, forward and backward.

``convert(model, policy)`` swaps, in place:

- ``nn.Linear`` -> ``QuantLinear``: all three GEMMs quantized (the microxcaling ``mx/linear.py`` pattern):
    forward      y  = Q_act(x)        @ Q_w(W)^T     reduction over in_features
    grad-input   dx = Q_grad(dy)      @ Q_w(W)       reduction over out_features
    grad-weight  dW = Q_grad(dy)^T    @ Q_act(x)     reduction over the batch/token rows
  Block scaling runs along each GEMM's own reduction axis (so W, x and dy are quantized twice, once per GEMM,
  when the spec is block-scaled); channel scaling puts one scale per row of the left operand / column of the
  right one (over the reduction axis); tensor scaling is shared. The bias is added in fp32 and its gradient is
  the fp32 sum of the unquantized grad_output (as Transformer Engine does).
- ``nn.Embedding`` -> ``QuantEmbedding``: the table is quantized per ``policy.weight`` (block/channel along the
  embedding dimension) in the forward; the gradient passes straight through to the fp32 table.

- ``nn.Conv2d`` -> ``QuantConv2d`` (emulated only): the same three GEMMs of the implicit im2col, each operand
  quantized along its own reduction axis (axes in the comment above ``_QuantConv2dFn``); not converted when
  the padding is a string ("same"/"valid") or padding_mode is not "zeros".

Not converted (kept in full precision): attention score/value matmuls inside ``scaled_dot_product_attention``,
normalisations, pooling, element-wise ops.

Backends: ``"emulated"`` quantizes then multiplies in fp32 (or through ``lowprec.accumulate.matmul`` when the
policy has an accumulator). ``"native"`` runs ``torch._scaled_mm`` on float8 operands: each operand is first
quantized by lowprec (so every rounding mode works) and its grid values cast exactly to
``torch.float8_e4m3fn``/``float8_e5m2``; it needs E4M3/E5M2 formats with no, tensor, delayed or channel
(row-wise) scaling, no accumulator, and ``lowprec.hardware.probe()`` saying ``_scaled_mm`` runs on the device.
``"auto"`` picks native per GEMM when those hold (and, on CUDA, dimensions are multiples of 16), else emulated.
Native and emulated multiply the same values and both accumulate in fp32: they differ by summation order only.

Delayed scaling (spec ``e4m3:delayed16``, ``e4m3:delayed1024:margin=1``; Transformer Engine's DelayedScaling):
every site (layer x role: weight, activation, grad) whose spec is delayed owns a ``lowprec.DelayedScaler``
(``layer._site.scalers[role]``). Each forward (weight, activation) / backward (grad) call quantizes with the scale
from that site's amax history of the previous calls (``scale = amax_h * 2**margin / fmt.max``; the first call,
with an empty history, uses its own amax), then appends its own amax; an operand quantized twice in one step
(the re-quantization for the second backward GEMM) reuses that step's scale and records once. Values above the
stale range overflow per the spec's ``saturate`` flag (clamped by default; ``nosat``: NaN for E4M3, inf for E5M2)
and show in telemetry's ``saturated_frac`` (and ``nan_count``/``inf_count``). Histories are recorded in training
mode only (``model.eval()`` freezes them, like BatchNorm statistics), are plain attributes (not in
``state_dict``: a resumed run restarts them) and are reset by re-``convert``/``configure``. The native backend
supports delayed specs: a delayed scale is a per-tensor scale handed to ``torch._scaled_mm``.
Outside layers (``quantize``, optimizer states/gradients in ``lowprec.optim``) a delayed spec has no history and
scales by the current amax (see ``lowprec.Scaling``).

Stochastic rounding in layers draws from torch's global RNG (seed it for reproducible runs); operands whose
spec is block/channel-scaled or stochastic are re-quantized from the saved full-precision tensor in the backward
(as microxcaling does), tensor-scaled deterministic ones reuse the forward's quantized tensor.

Under the ``fp32`` policy (or any policy leaving weight, activation, grad and accumulator unset) the layers call
``F.linear`` / ``F.embedding`` directly: bit-for-bit the unconverted model. Parameters are the same objects
(an optimizer built before ``convert`` keeps working) and ``state_dict`` keys are unchanged.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowprec import hardware
from lowprec.accumulate import matmul as acc_matmul
from lowprec.policy import PrecisionPolicy, is_identity
from lowprec.quantize import QuantSpec, Rounding, quantize_with_scale
from lowprec.delayed import DelayedScaler
from lowprec.scaling import finite_amax
from lowprec.telemetry import Telemetry

__all__ = ["convert", "QuantLinear", "QuantConv2d", "QuantEmbedding", "BACKENDS", "native_dtype"]

BACKENDS = ("auto", "native", "emulated")
_GEMM_ROLES = ("weight", "activation", "grad")


def native_dtype(spec: QuantSpec | None) -> torch.dtype | None:
    """The torch float8 dtype holding ``spec``'s element format exactly, or None."""
    if spec is None:
        return None
    f = spec.format
    key = (f.kind, f.exp_bits, f.man_bits, f.bias, f.has_inf, f.has_nan)
    if key == ("float", 4, 3, 7, False, True) and hasattr(torch, "float8_e4m3fn"):
        return torch.float8_e4m3fn
    if key == ("float", 5, 2, 15, True, True) and hasattr(torch, "float8_e5m2"):
        return torch.float8_e5m2
    return None


def _native_reason(spec: QuantSpec | None) -> str | None:
    """Why ``spec`` cannot be a native _scaled_mm operand (None if it can)."""
    if spec is None:
        return "operand not quantized"
    if native_dtype(spec) is None:
        return f"format {spec.format.name} is not E4M3/E5M2"
    sc = spec.scaling
    if sc is not None and sc.mode not in ("tensor", "channel", "delayed"):
        return f"{sc.mode} scaling (native needs none, tensor, delayed or channel/row-wise)"
    return None


def _axis_spec(spec: QuantSpec, reduce_axis: int, channel_axis: int | None = None) -> QuantSpec:
    """The spec for an operand whose GEMM reduces over ``reduce_axis`` (2-D: channel scaling keeps the other
    axis; N-d operands pass ``channel_axis``)."""
    sc = spec.scaling
    if sc is None or sc.mode in ("tensor", "delayed"):
        return spec
    if sc.mode == "block":
        return replace(spec, scaling=replace(sc, axis=reduce_axis))
    if sc.mode == "channel":  # one scale per index of the kept axis, amax over the reduction axis
        return replace(spec, scaling=replace(sc, axis=1 - reduce_axis if channel_axis is None else channel_axis))
    raise ValueError(f"unknown scaling mode {sc.mode!r}")


def _axis_free(spec: QuantSpec | None) -> bool:
    """Quantizing with this spec gives the same result whatever the reduction axis (and is deterministic)."""
    if spec is None:
        return True
    deterministic = spec.rounding != Rounding.STOCHASTIC
    return deterministic and (spec.scaling is None or spec.scaling.mode in ("tensor", "delayed"))


def _is_delayed(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.scaling is not None and spec.scaling.mode == "delayed"


class _Operand:
    """A quantized 2-D operand: values ``q`` (fp32, on the grid times scale), its scale (None = 1) and spec."""

    __slots__ = ("q", "scale", "spec")

    def __init__(self, q: torch.Tensor, scale: torch.Tensor | None, spec: QuantSpec | None):
        self.q, self.scale, self.spec = q, scale, spec

    def t(self) -> "_Operand":
        s = self.scale
        if s is not None and s.dim() == 2:
            s = s.t()
        return _Operand(self.q.t(), s, self.spec)


class _Site:
    """Per-layer configuration shared by the forward and backward of its autograd function."""

    def __init__(self, policy: PrecisionPolicy, backend: str, name: str, telemetry: Telemetry | None):
        self.policy = policy
        self.backend = backend
        self.name = name
        self.telemetry = telemetry
        self.specs = {r: (None if is_identity(getattr(policy, r)) else getattr(policy, r)) for r in _GEMM_ROLES}
        self.accumulator = policy.accumulator
        self.noop = all(s is None for s in self.specs.values()) and self.accumulator is None
        # delayed scaling: one amax history per role of this layer (not in state_dict); recorded in training mode
        self.scalers = {r: DelayedScaler.from_spec(s) for r, s in self.specs.items() if _is_delayed(s)}
        self.update_history = True
        if backend == "native":
            problems = self.native_problems("weight", "activation") + self.native_problems("grad", "weight") \
                + self.native_problems("grad", "activation")
            if problems:
                raise ValueError(f"backend='native' impossible for policy {policy}: {'; '.join(sorted(set(problems)))}"
                                 f"; use backend='auto' or 'emulated'")

    def native_problems(self, role_a: str, role_b: str) -> list[str]:
        out = []
        for role in (role_a, role_b):
            why = _native_reason(self.specs[role])
            if why:
                out.append(f"{role}: {why}")
        if self.accumulator is not None:
            out.append("an accumulator is emulated only")
        return out

    def quant(self, t: torch.Tensor, role: str, reduce_axis: int, record: bool,
              channel_axis: int | None = None, delayed_scale: torch.Tensor | None = None) -> _Operand:
        """Quantize ``t`` for a GEMM reducing over ``reduce_axis`` (block scaling runs along it); channel
        scaling puts one scale per index of ``channel_axis`` (default: the other axis of a 2-D operand).

        Delayed specs: the scale comes from the role's amax history (steps before this one), then ``amax(t)`` is
        appended (in training mode); ``delayed_scale`` re-quantizes the same operand with the scale already used
        this step (nothing recorded). Ignored for other specs."""
        spec = self.specs[role]
        if spec is None:
            return _Operand(t, None, None)
        spec = _axis_spec(spec, reduce_axis, channel_axis)
        if _is_delayed(spec):
            if delayed_scale is None:
                scaler = self.scalers[role]
                amax = finite_amax(t.detach())
                delayed_scale = scaler.scales_for(amax)[1]
                if self.update_history:
                    scaler.update(amax)
            q, scale = quantize_with_scale(t, spec, scale=delayed_scale)
        else:
            q, scale = quantize_with_scale(t, spec)
        tel = self.telemetry
        if record and tel is not None and tel.wants():
            tel.record(f"{self.name}:{role}", role, t, q, scale=scale, fmt_max=spec.format.max, fmt=str(spec))
        return _Operand(q, scale, spec)

    def requant(self, t: torch.Tensor, role: str, saved_q: torch.Tensor, saved_scale: torch.Tensor | None,
                reduce_axis: int, channel_axis: int | None = None) -> _Operand:
        """The operand for a backward GEMM reducing over ``reduce_axis``: the forward's quantized ``saved_q`` when
        the role's spec gives the same result on every axis, else ``t`` re-quantized along it (the forward's
        delayed scale ``saved_scale`` reused, nothing recorded)."""
        if _axis_free(self.specs[role]):
            return _Operand(saved_q, saved_scale, self.specs[role])
        return self.quant(t, role, reduce_axis=reduce_axis, record=False, channel_axis=channel_axis,
                          delayed_scale=saved_scale)

    # ------------------------------------------------------------------ GEMM
    def use_native(self, a: _Operand, b: _Operand) -> bool:
        if self.backend == "emulated" or self.accumulator is not None:
            return False
        if _native_reason(a.spec) or _native_reason(b.spec):
            return False
        rowwise = any(o.spec.scaling is not None and o.spec.scaling.mode == "channel" for o in (a, b))
        device = a.q.device
        ok = hardware.scaled_mm_ok(device, rowwise=rowwise)
        if ok and device.type == "cuda":
            ok = all(d % 16 == 0 for d in (*a.q.shape, b.q.shape[1]))
        if not ok and self.backend == "native":
            raise RuntimeError(f"backend='native': torch._scaled_mm unavailable for shapes {tuple(a.q.shape)} x "
                               f"{tuple(b.q.shape)} on {device}: {hardware.probe()}")
        return ok

    def gemm(self, a: _Operand, b: _Operand) -> torch.Tensor:
        """a [M, K] @ b [K, N] in fp32."""
        if self.use_native(a, b):
            return _scaled_mm(a, b)
        if self.accumulator is not None:
            return acc_matmul(a.q, b.q, self.accumulator)
        return a.q @ b.q


def _to_fp8(op: _Operand) -> tuple[torch.Tensor, torch.Tensor | None]:
    if op.scale is None:
        q = op.q
    else:  # grid values, so the cast below is exact; a zero scale (all-zero tensor) must not give 0/0
        q = op.q / torch.where(op.scale == 0, torch.ones_like(op.scale), op.scale)
    return q.to(native_dtype(op.spec)), op.scale


def _scaled_mm(a: _Operand, b: _Operand) -> torch.Tensor:
    a8, sa = _to_fp8(a)
    b8, sb = _to_fp8(b)
    M, N = a8.shape[0], b8.shape[1]
    rowwise = (sa is not None and sa.numel() > 1) or (sb is not None and sb.numel() > 1)
    dev = a8.device
    if rowwise:  # per row of a, per column of b
        sa = torch.ones(M, device=dev) if sa is None else sa.float().expand(M, a8.shape[1])[:, 0].clone()
        sb = torch.ones(N, device=dev) if sb is None else sb.float().expand(b8.shape[0], N)[0, :].clone()
        sa, sb = sa.reshape(M, 1), sb.reshape(1, N)   # fresh storage: _scaled_mm wants unit strides
    else:
        sa = torch.ones((), device=dev) if sa is None else sa.float().reshape(())
        sb = torch.ones((), device=dev) if sb is None else sb.float().reshape(())
    return torch._scaled_mm(a8.contiguous(), b8.t().contiguous().t(), scale_a=sa, scale_b=sb,
                            out_dtype=torch.float32)


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, site: _Site):
        out_dtype = torch.result_type(x, weight)
        x2 = x.reshape(-1, x.shape[-1]).float()
        w = weight.float()
        qx = site.quant(x2, "activation", reduce_axis=1, record=True)
        qw = site.quant(w, "weight", reduce_axis=1, record=True)
        y = site.gemm(qx, qw.t())
        if bias is not None:
            y = y + bias.float()
        ctx.site = site
        ctx.update_history = site.update_history   # the backward records grad amaxes iff this forward did
        ctx.x_shape = x.shape
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, w, qx.q, qw.q, qx.scale, qw.scale)
        return y.reshape(*x.shape[:-1], weight.shape[0]).to(out_dtype)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        site: _Site = ctx.site
        site.update_history = ctx.update_history
        x2, w, qxq, qwq, qxs, qws = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1]).float()
        grad_x = grad_w = grad_b = None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        recorded = False
        if need_x:   # dx [M, K] = dy [M, N] @ W [N, K]; reduction over N
            qg = site.quant(g2, "grad", reduce_axis=1, record=True)
            recorded = True
            qw = site.requant(w, "weight", qwq, qws, reduce_axis=0)
            grad_x = site.gemm(qg, qw).reshape(ctx.x_shape).to(ctx.dtypes[0])
        if need_w:   # dW [N, K] = dy^T [N, M] @ x [M, K]; reduction over M
            if recorded and _axis_free(site.specs["grad"]):
                qgw = qg
            else:
                qgw = site.quant(g2, "grad", reduce_axis=0, record=not recorded,
                                 delayed_scale=qg.scale if recorded else None)
            qx = site.requant(x2, "activation", qxq, qxs, reduce_axis=0)
            grad_w = site.gemm(qgw.t(), qx).to(ctx.dtypes[1])
        if ctx.has_bias and need_b:
            grad_b = g2.sum(0).to(ctx.dtypes[2])
        return grad_x, grad_w, grad_b, None


class QuantLinear(nn.Linear):
    """nn.Linear whose three GEMMs are quantized per ``policy`` (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 policy: PrecisionPolicy | str = "fp32", backend: str = "auto", name: str = "",
                 telemetry: Telemetry | None = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.configure(policy, backend=backend, name=name, telemetry=telemetry)

    def configure(self, policy: PrecisionPolicy | str, *, backend: str = "auto", name: str = "",
                  telemetry: Telemetry | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {BACKENDS}")
        self._site = _Site(PrecisionPolicy.parse(policy), backend, name, telemetry)

    @property
    def policy(self) -> PrecisionPolicy:
        return self._site.policy

    @classmethod
    def from_linear(cls, lin: nn.Linear, policy: PrecisionPolicy | str, *, backend: str = "auto", name: str = "",
                    telemetry: Telemetry | None = None) -> "QuantLinear":
        with torch.device("meta"):
            new = cls(lin.in_features, lin.out_features, lin.bias is not None, policy=policy, backend=backend,
                      name=name, telemetry=telemetry)
        new.weight = lin.weight          # the same Parameter objects
        new.bias = lin.bias
        new.train(lin.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._site.noop:
            return F.linear(x, self.weight, self.bias)
        self._site.update_history = self.training
        return _QuantLinearFn.apply(x, self.weight, self.bias, self._site)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, policy={self._site.policy}, backend={self._site.backend}"


# Conv2d as three GEMMs (implicit im2col). Axes of the 4-D operands, per GEMM:
#   forward  y[b,o,h,w]  = sum_{c,i,j} x[b,c,.,.] W[o,c,i,j]   block along c (x axis 1, W axis 1);
#                                                            channel: per sample of x (0), per o of W (0)
#   grad-in  dx[b,c,.,.] = sum_{o,i,j} dy[b,o,.,.] W[o,c,i,j] block along o (dy axis 1, W axis 0);
#                                                            channel: per sample of dy (0), per c of W (1)
#   grad-w   dW[o,c,i,j] = sum_{b,h,w} dy[b,o,h,w] x[b,c,.,.] block along the image width (axis 3 of both);
#                                                            channel: per o of dy (1), per c of x (1)
class _QuantConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, site: _Site, conv: tuple):
        stride, padding, dilation, groups = conv
        out_dtype = torch.result_type(x, weight)
        x32, w32 = x.float(), weight.float()
        qx = site.quant(x32, "activation", reduce_axis=1, channel_axis=0, record=True)
        qw = site.quant(w32, "weight", reduce_axis=1, channel_axis=0, record=True)
        y = F.conv2d(qx.q, qw.q, None if bias is None else bias.float(), stride, padding, dilation, groups)
        ctx.site, ctx.conv, ctx.has_bias = site, conv, bias is not None
        ctx.update_history = site.update_history
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(x32, w32, qx.q, qw.q, qx.scale, qw.scale)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, gy):
        site: _Site = ctx.site
        site.update_history = ctx.update_history
        stride, padding, dilation, groups = ctx.conv
        x32, w32, qxq, qwq, qxs, qws = ctx.saved_tensors
        g = gy.float()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None

        def conv_bwd(gq, xq, wq, mask):
            return torch.ops.aten.convolution_backward(gq, xq, wq, None, list(stride), list(padding),
                                                       list(dilation), False, [0, 0], groups, mask)
        recorded = False
        if need_x:
            qg = site.quant(g, "grad", reduce_axis=1, channel_axis=0, record=True)
            recorded = True
            wq = site.requant(w32, "weight", qwq, qws, reduce_axis=0, channel_axis=1).q
            grad_x = conv_bwd(qg.q, x32, wq, [True, False, False])[0].to(ctx.dtypes[0])
        if need_w:
            if recorded and _axis_free(site.specs["grad"]):
                gq = qg.q
            else:
                gq = site.quant(g, "grad", reduce_axis=3, channel_axis=1, record=not recorded,
                                delayed_scale=qg.scale if recorded else None).q
            xq = site.requant(x32, "activation", qxq, qxs, reduce_axis=3, channel_axis=1).q
            grad_w = conv_bwd(gq, xq, w32, [False, True, False])[1].to(ctx.dtypes[1])
        if ctx.has_bias and need_b:
            grad_b = g.sum((0, 2, 3)).to(ctx.dtypes[2])
        return grad_x, grad_w, grad_b, None, None


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d whose three GEMMs are quantized per ``policy`` (emulated; numeric padding, zeros mode)."""

    def configure(self, policy: PrecisionPolicy | str, *, backend: str = "auto", name: str = "",
                  telemetry: Telemetry | None = None) -> None:
        site = _Site(PrecisionPolicy.parse(policy), "emulated" if backend == "auto" else backend, name, telemetry)
        if site.backend == "native":
            raise ValueError("backend='native' is not available for Conv2d; use 'auto' or 'emulated'")
        if site.accumulator is not None:
            raise ValueError("accumulator emulation is implemented for Linear layers only, not Conv2d")
        self._site = site

    @staticmethod
    def convertible(conv: nn.Conv2d) -> bool:
        return not isinstance(conv.padding, str) and conv.padding_mode == "zeros"

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, policy: PrecisionPolicy | str, *, backend: str = "auto", name: str = "",
                  telemetry: Telemetry | None = None) -> "QuantConv2d":
        if not cls.convertible(conv):
            raise ValueError("QuantConv2d needs numeric padding and padding_mode='zeros'")
        with torch.device("meta"):
            new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        new.configure(policy, backend=backend, name=name, telemetry=telemetry)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._site.noop:
            return super().forward(x)
        conv = (self.stride, self.padding, self.dilation, self.groups)
        self._site.update_history = self.training
        return _QuantConv2dFn.apply(x, self.weight, self.bias, self._site, conv)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, policy={self._site.policy}"


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize in the forward, identity gradient (straight-through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, site: _Site, role: str, reduce_axis: int):
        return site.quant(w.float(), role, reduce_axis=reduce_axis, record=True).q.to(w.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None, None, None


class QuantEmbedding(nn.Embedding):
    """nn.Embedding whose table is quantized per ``policy.weight`` in the forward (straight-through backward)."""

    def configure(self, policy: PrecisionPolicy | str, *, backend: str = "auto", name: str = "",
                  telemetry: Telemetry | None = None) -> None:
        self._site = _Site(PrecisionPolicy.parse(policy), "emulated", name, telemetry)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, policy: PrecisionPolicy | str, *, name: str = "",
                       telemetry: Telemetry | None = None) -> "QuantEmbedding":
        with torch.device("meta"):
            new = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, max_norm=emb.max_norm,
                      norm_type=emb.norm_type, scale_grad_by_freq=emb.scale_grad_by_freq, sparse=emb.sparse)
        new.weight = emb.weight
        new.train(emb.training)
        new.configure(policy, name=name, telemetry=telemetry)
        return new

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.weight
        self._site.update_history = self.training
        if self._site.specs["weight"] is not None:
            # a row is one embedding vector: block/channel scaling along the embedding dimension
            w = _FakeQuantSTE.apply(w, self._site, "weight", 1)
        return F.embedding(idx, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, policy={self._site.policy}"


def convert(model: nn.Module, policy: PrecisionPolicy | str, *,
            filter: Callable[[str, nn.Module], bool] | None = None, backend: str = "auto",
            telemetry: Telemetry | None = None) -> nn.Module:
    """Swap ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` modules of ``model`` (in place) for quantized ones.

    ``filter(name, module) -> bool`` selects which modules to convert (default: all). ``policy``: a
    PrecisionPolicy, a preset name or a compact string. Already-converted layers get the new policy.
    Returns ``model`` (a bare layer passed as ``model`` is returned converted). With ``backend="native"`` the
    Conv2d layers run emulated (there is no native FP8 convolution); Conv2d with string padding ("same") or a
    non-zeros padding_mode is left unconverted.
    Telemetry sites are ``"<module name>:<role>"``.
    """
    policy = PrecisionPolicy.parse(policy)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {BACKENDS}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert needs an nn.Module, got {type(model).__name__}")

    def swap(name: str, mod: nn.Module) -> nn.Module:
        if filter is not None and not filter(name, mod):
            return mod
        if isinstance(mod, (QuantLinear, QuantEmbedding, QuantConv2d)):
            mod.configure(policy, backend=backend, name=name or mod.__class__.__name__, telemetry=telemetry)
            return mod
        if type(mod) is nn.Linear:
            return QuantLinear.from_linear(mod, policy, backend=backend, name=name or "linear", telemetry=telemetry)
        if type(mod) is nn.Conv2d and QuantConv2d.convertible(mod):
            return QuantConv2d.from_conv(mod, policy, backend="auto" if backend == "native" else backend,
                                         name=name or "conv", telemetry=telemetry)
        if type(mod) is nn.Embedding:
            return QuantEmbedding.from_embedding(mod, policy, name=name or "embedding", telemetry=telemetry)
        return mod

    root = swap("", model)
    if root is not model:
        return root
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            new = swap(full, child)
            if new is not child:
                setattr(parent, child_name, new)
    return model
