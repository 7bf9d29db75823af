"""Delayed (Transformer Engine style) scaling: a per-site scale taken from the amax history of earlier calls.

Sits above :mod:`lowprec.quantize` (it quantizes with the scale it keeps); nothing below imports it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .quantize import quantize_with_scale, spec
from .scaling import finite_amax
from .spec import Scaling

__all__ = ["DelayedScaler"]


class DelayedScaler:
    """Transformer Engine style delayed scaling for one site (one tensor role of one layer).

    The scale used at call ``t`` comes from the amax history of calls ``< t``; the call's own amax is appended
    after use (so a spike above the history's range overflows: it saturates, or gives inf/NaN with
    ``saturate=False`` specs). ``amax_h`` is the history's max (``algo="max"``, over the last ``history_len``
    amaxes) or the latest amax (``algo="most_recent"``); then

        ``scale_inv = amax_h * 2**margin / fmt.max``  (the dequantization multiplier: ``q = round(x / scale_inv) *
        scale_inv``, the convention of every lowprec scale; TE's ``scale_inv``)
        ``scale = (fmt.max / amax_h) / 2**margin``    (TE's quantization multiplier, kept for reference and state
        dicts; computed directly, so it may differ from ``1 / scale_inv`` by one fp32 ulp)

    An amax of 0 keeps the previous scales (amax is taken over finite values). Before the first amax is
    recorded the scales are 1 (``init="unit"``, TE's initial scale) or, with ``init="current"`` (torchao's
    delayed scaling; what :meth:`from_spec` uses), the first call's own amax (a history of one).
    History and scales follow the device of the recorded amaxes; nothing here synchronizes with the device.
    """

    def __init__(self, fmt: Any = "e4m3", history_len: int = 1024, margin: int = 0, algo: str = "max", *,
                 init: str = "unit") -> None:
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
        self._tensor_spec = replace(self.spec, scaling=Scaling("tensor"))  # quantize_with_scale's given-scale path
        cpu = torch.device("cpu")  # explicit: layers are built under torch.device("meta")
        self.amax_history = torch.zeros(history_len, dtype=torch.float32, device=cpu)
        self.scale = torch.ones((), dtype=torch.float32, device=cpu)
        self.scale_inv = torch.ones((), dtype=torch.float32, device=cpu)
        self.steps = 0

    @classmethod
    def from_spec(cls, spec_: Any) -> "DelayedScaler":
        """The scaler for a spec with delayed scaling (``"e4m3:delayed16:margin=1"``): its history length,
        margin and algo, ``init="current"``; ``self.spec`` is the spec without its scaling."""
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
        """Quantize with the history's scale (``round(x / scale_inv) * scale_inv``, through
        :func:`lowprec.quantize_with_scale`), then record ``amax(x)``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        amax = finite_amax(x.detach())
        q, _ = quantize_with_scale(x, self._tensor_spec, generator, scale=self.scales_for(amax)[1].to(x.device))
        self.update(amax)
        return q

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
