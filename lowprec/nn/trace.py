"""Functional matmuls seen in one forward pass: the GEMMs no module conversion can reach.

``functional_gemms(model, *args, **kwargs)`` runs ``model(*args, **kwargs)`` once (``torch.no_grad``, every
module in eval mode, telemetry and delayed-scaling histories untouched, training flags restored) under a torch
function mode that counts the calls of ``torch.matmul`` / ``@`` / ``mm`` / ``bmm`` / ``addmm`` / ``baddbmm`` /
``einsum`` / ``F.linear`` / ``F.scaled_dot_product_attention`` that run in full precision, per innermost module.
Calls inside lowprec's own quantized computation (``lowprec.nn.site.QUANTIZED``) are not counted, nor calls
inside a converted Linear/Conv/Embedding (its row in the coverage report already says what it does).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lowprec.nn.attention import AttentionSite, QuantMultiheadAttention
from lowprec.nn.site import QuantizedRegion, QuantModule, Site

__all__ = ["functional_gemms", "GEMM_FUNCTIONS"]

GEMM_FUNCTIONS: dict[Any, str] = {
    torch.matmul: "matmul", torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul",
    torch.Tensor.__rmatmul__: "matmul", torch.mm: "mm", torch.Tensor.mm: "mm", torch.bmm: "bmm",
    torch.Tensor.bmm: "bmm", torch.addmm: "addmm", torch.baddbmm: "baddbmm", torch.einsum: "einsum",
    F.linear: "linear", F.scaled_dot_product_attention: "scaled_dot_product_attention",
}


class _Tracer(TorchFunctionMode):
    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.stack: list[nn.Module] = []
        self.seen: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = GEMM_FUNCTIONS.get(func)
        if name is not None and QuantizedRegion.depth == 0:
            inner = self.stack[-1] if self.stack else None
            if not (isinstance(inner, QuantModule) and not isinstance(inner, QuantMultiheadAttention)):
                self.seen[(self.names.get(id(inner), ""), name)] += 1
        return func(*args, **(kwargs or {}))


def _sites(model: nn.Module) -> list[Site]:
    out = []
    for mod in model.modules():
        if isinstance(mod, QuantModule):
            out.append(mod.site)
        att = mod.attention if isinstance(mod, QuantMultiheadAttention) else \
            getattr(getattr(mod, "lowprec_attention", None), "site", None)
        if isinstance(att, AttentionSite):
            out += [att.qk, att.pv]
    return out


def functional_gemms(model: nn.Module, *args: Any, **kwargs: Any) -> Counter:
    """``Counter((module name, function) -> calls)`` of the full-precision matmuls of one forward (module
    docstring). The root module's name is ``""``."""
    names = {id(m): n for n, m in model.named_modules()}
    tracer = _Tracer(names)
    training = {m: m.training for m in model.modules()}
    sites = _sites(model)
    sinks = [s.telemetry for s in sites]

    def push(mod: nn.Module, inputs: tuple) -> None:
        tracer.stack.append(mod)

    def pop(mod: nn.Module, inputs: tuple, output: Any) -> None:
        tracer.stack.pop()

    handles = [m.register_forward_pre_hook(push) for m in model.modules()]
    handles += [m.register_forward_hook(pop, always_call=True) for m in model.modules()]
    try:
        for s in sites:
            s.telemetry = None
        model.eval()
        with torch.no_grad(), tracer:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for s, sink in zip(sites, sinks):
            s.telemetry = sink
        for m, flag in training.items():
            m.training = flag
    return tracer.seen
