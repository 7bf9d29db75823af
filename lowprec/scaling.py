"""Scale selection: per-tensor, per-channel and per-block scales (fp32, E8M0 or E4M3), and a delayed scaler.

Convention: ``q = round(x / scale) * scale`` (the scale is the dequantization multiplier). Amax is taken over
finite values only, so a NaN or inf element stays NaN/inf (subject to the element format's overflow rule) instead
of poisoning every scale. An all-zero tensor or block gets a finite, non-zero scale (never NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .formats import FORMATS, Format

if TYPE_CHECKING:
    from .quantize import Scaling

__all__ = ["ScaleInfo", "compute_scale", "to_scaling_view", "finite_amax", "DelayedScaler"]

_E4M3 = FORMATS["e4m3"]


@dataclass
class ScaleInfo:
    """``scale``: float32, broadcastable to the scaling view (see :func:`to_scaling_view`).
    ``codes``: how the scale is stored (uint8 E8M0/E4M3 codes, or the float32 scale itself).
    ``global_scale``: the float32 tensor scale multiplying E4M3 block scales (None otherwise)."""

    scale: torch.Tensor
    codes: torch.Tensor
    global_scale: torch.Tensor | None = None


def finite_amax(x: torch.Tensor, dim: Any = None, keepdim: bool = False) -> torch.Tensor:
    """max |x| over finite values (NaN and ±inf count as 0)."""
    a = x.abs().nan_to_num_(nan=0.0, posinf=0.0)
    if dim is None:
        return a.amax() if not keepdim else a.amax(dim=tuple(range(a.dim())), keepdim=True)
    return a.amax(dim=dim, keepdim=keepdim)


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"scaling axis {axis} is out of range for a tensor with {ndim} dimension(s)")
    return axis % ndim


def to_scaling_view(x: torch.Tensor, scaling: "Scaling") -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Arrange ``x`` so that one scale per group broadcasts over it; returns ``(view, undo)``.

    tensor/channel: ``x`` itself. block: ``axis`` moved last, padded with zeros to a multiple of ``block_size``,
    reshaped to ``(..., n_blocks, block_size)``; ``undo`` maps a tensor of that shape back to ``x``'s layout."""
    if scaling.mode != "block":
        if scaling.mode == "channel":
            if x.dim() == 0:
                raise ValueError("channel scaling needs a tensor with at least one dimension")
            _norm_axis(scaling.axis, x.dim())
        return x, (lambda t: t)
    if x.dim() == 0:
        raise ValueError("block scaling needs a tensor with at least one dimension")
    ax = _norm_axis(scaling.axis, x.dim())
    bs = scaling.block_size
    xm = x.movedim(ax, -1)
    length = xm.shape[-1]
    pad = (-length) % bs
    if pad:
        xm = torch.nn.functional.pad(xm, (0, pad))
    lead = xm.shape[:-1]
    view = xm.reshape(*lead, (length + pad) // bs, bs)

    def undo(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(*lead, length + pad)[..., :length]
        return t.movedim(-1, ax).contiguous()

    return view, undo


def _group_amax(view: torch.Tensor, scaling: "Scaling") -> torch.Tensor:
    if scaling.mode in ("tensor", "delayed"):
        return finite_amax(view, keepdim=True)
    if scaling.mode == "channel":
        ax = _norm_axis(scaling.axis, view.dim())
        dims = tuple(d for d in range(view.dim()) if d != ax)
        if not dims:
            return view.abs().nan_to_num_(nan=0.0, posinf=0.0)
        return finite_amax(view, dim=dims, keepdim=True)
    return finite_amax(view, dim=-1, keepdim=True)


def e8m0_exponent(amax: torch.Tensor, fmt: Format) -> torch.Tensor:
    """OCP MX shared exponent: floor(log2(amax)) - emax_elem, clamped to [-127, 127]; -127 where amax == 0."""
    _, e = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1): floor(log2(amax)) = e - 1
    exp = (e - 1 - fmt.emax).clamp_(-127, 127)
    return torch.where(amax > 0, exp, torch.full_like(exp, -127))


def pow2(exp: torch.Tensor) -> torch.Tensor:
    """2**exp as float32 (exact, including 2**-127)."""
    return torch.exp2(exp.to(torch.float64)).to(torch.float32)


def compute_scale(view: torch.Tensor, scaling: "Scaling", fmt: Format) -> ScaleInfo:
    """Scales for ``view`` (from :func:`to_scaling_view`) so that each group's amax maps to ``fmt.max``.

    ``"delayed"`` scaling has no history here: the current tensor amax is used (a history of one), divided by
    ``2**margin`` (scale ``amax * 2**margin / fmt.max``); :class:`DelayedScaler` holds a real history."""
    amax = _group_amax(view, scaling).to(torch.float32)
    if scaling.scale_format == "e8m0":
        exp = e8m0_exponent(amax, fmt)
        return ScaleInfo(pow2(exp), (exp + 127).to(torch.uint8))
    if scaling.scale_format == "e4m3":
        t_amax = finite_amax(view)
        g = t_amax / (_E4M3.max * fmt.max)
        g = torch.where((g > 0) & torch.isfinite(g), g, torch.ones_like(g)).to(torch.float32)
        s_blk = ((amax / fmt.max) / g).clamp_(max=_E4M3.max).to(torch.float8_e4m3fn)
        return ScaleInfo(s_blk.to(torch.float32) * g, s_blk.view(torch.uint8), g)
    s = amax / fmt.max
    if scaling.mode == "delayed":  # no history here: the current amax (a history of one), with the margin
        s = s * 2.0 ** scaling.margin
    s = torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return ScaleInfo(s, s)


class DelayedScaler:
    """Transformer Engine style delayed scaling for one site (one tensor role of one layer).

    The scale used at call ``t`` comes from the amax history of calls ``< t``; the call's own amax is appended
    after use (so a spike above the history's range overflows: it saturates, or gives inf/NaN with
    ``saturate=False`` specs). ``amax_h`` is the history's max (``algo="max"``, over the last ``history_len``
    amaxes) or the latest amax (``algo="most_recent"``); then, as TE,

        ``scale = (fmt.max / amax_h) / 2**margin``   (multiplier:   ``q = round(x * scale) / scale``)
        ``scale_inv = amax_h * 2**margin / fmt.max`` (lowprec's dequantization multiplier: ``q = round(x /
        scale_inv) * scale_inv``; computed directly, so it may differ from ``1 / scale`` by one fp32 ulp)

    An amax of 0 keeps the previous scales (amax is taken over finite values). Before the first amax is
    recorded the scales are 1 (``init="unit"``, TE's initial scale) or, with ``init="current"`` (torchao's
    delayed scaling; what :meth:`from_spec` uses), the first call's own amax (a history of one).
    History and scales follow the device of the recorded amaxes; nothing here synchronizes with the device.
    """

    def __init__(self, fmt: Any = "e4m3", history_len: int = 1024, margin: int = 0, algo: str = "max", *,
                 init: str = "unit") -> None:
        from .quantize import spec

        self.spec = spec(fmt)
        if self.spec.scaling is not None:
            raise ValueError(f"DelayedScaler needs an unscaled format, got {self.spec}; for a spec with delayed "
                             "scaling ('e4m3:delayed16') use DelayedScaler.from_spec")
        if not isinstance(history_len, int) or isinstance(history_len, bool) or history_len < 1:
            raise ValueError(f"history_len must be a positive int, got {history_len!r}")
        if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
            raise ValueError(f"margin must be a non-negative int, got {margin!r}")
        if algo not in ("max", "most_recent"):
            raise ValueError(f"algo must be 'max' or 'most_recent', got {algo!r}")
        if init not in ("unit", "current"):
            raise ValueError(f"init must be 'unit' (scale 1 before the first amax) or 'current' (the first "
                             f"call's own amax), got {init!r}")
        self.history_len, self.margin, self.algo, self.init = history_len, margin, algo, init
        cpu = torch.device("cpu")  # explicit: layers are built under torch.device("meta")
        self.amax_history = torch.zeros(history_len, dtype=torch.float32, device=cpu)
        self.scale = torch.ones((), dtype=torch.float32, device=cpu)
        self.scale_inv = torch.ones((), dtype=torch.float32, device=cpu)
        self.steps = 0

    @classmethod
    def from_spec(cls, spec_: Any) -> "DelayedScaler":
        """The scaler for a spec with delayed scaling (``"e4m3:delayed16:margin=1"``): its history length,
        margin and algo, ``init="current"``; ``self.spec`` is the spec without its scaling."""
        from dataclasses import replace
        from .quantize import spec

        s = spec(spec_)
        if s.scaling is None or s.scaling.mode != "delayed":
            raise ValueError(f"DelayedScaler.from_spec needs a spec with delayed scaling (e.g. 'e4m3:delayed16'), "
                             f"got {s}")
        sc = s.scaling
        return cls(replace(s, scaling=None), sc.history_len, sc.margin, sc.algo, init="current")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.quantize(x, generator)

    def _from_amax(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, scale_inv) for history amax ``a``; where ``a`` is 0 or not finite, the current ones."""
        a = a.to(torch.float32)
        ok = (a > 0) & torch.isfinite(a)
        safe = torch.where(ok, a, torch.ones_like(a))
        fmax = self.spec.format.max
        scale = torch.where(ok, (fmax / safe) / 2.0**self.margin, self.scale.to(a.device))
        scale_inv = torch.where(ok, (safe / fmax) * 2.0**self.margin, self.scale_inv.to(a.device))
        return scale, scale_inv

    def scales_for(self, amax: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, scale_inv)`` to use for a tensor whose own amax is ``amax``: from the history (the current
        amax only enters on the first call with ``init="current"``). Does not record anything."""
        if self.steps == 0 and self.init == "current":
            return self._from_amax(torch.as_tensor(amax, dtype=torch.float32))
        return self.scale, self.scale_inv

    def quantize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Quantize with the history's scale (``round(x * scale) / scale``), then record ``amax(x)``."""
        from .quantize import round_to_format, _check_tensor

        _check_tensor(x)
        x32 = x.detach().float()
        amax = finite_amax(x32)
        s = self.scales_for(amax)[0].to(x.device)
        q = round_to_format(x32 * s, self.spec.format, self.spec.rounding, saturate=self.spec.saturate,
                            flush_subnormals=self.spec.flush_subnormals, rand_bits=self.spec.rand_bits,
                            generator=generator)
        out = (q / s).to(x.dtype)
        self.update(amax)
        return out

    def update(self, amax: torch.Tensor | float) -> None:
        """Record one amax (a 0-dim tensor on any device, or a float) and recompute the scales."""
        amax = torch.as_tensor(amax, dtype=torch.float32).reshape(())
        if self.amax_history.device != amax.device:
            self.amax_history = self.amax_history.to(amax.device)
        self.amax_history[self.steps % self.history_len] = amax
        self.steps += 1
        a = self.amax_history.max() if self.algo == "max" else amax
        self.scale, self.scale_inv = self._from_amax(a)

    def state_dict(self) -> dict[str, Any]:
        return {"amax_history": self.amax_history.clone(), "scale": self.scale.clone(),
                "scale_inv": self.scale_inv.clone(), "steps": self.steps, "spec": str(self.spec),
                "margin": self.margin, "algo": self.algo, "init": self.init}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.amax_history = d["amax_history"].clone().to(torch.float32)
        self.history_len = self.amax_history.numel()
        self.scale = d["scale"].clone().to(torch.float32)
        self.scale_inv = d["scale_inv"].clone().to(torch.float32) if "scale_inv" in d else 1.0 / self.scale
        self.steps = int(d["steps"])
        self.margin, self.algo = d.get("margin", self.margin), d.get("algo", self.algo)
        self.init = d.get("init", self.init)

    def __repr__(self) -> str:
        return (f"DelayedScaler({str(self.spec)!r}, history_len={self.history_len}, margin={self.margin}, "
                f"algo={self.algo!r}, init={self.init!r}, steps={self.steps})")
