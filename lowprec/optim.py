"""Low-precision gradients, packed optimizer states and master weights around any torch optimizer.

``wrap(optimizer, policy)`` returns a ``LowPrecisionOptimizer``: a ``torch.optim.Optimizer`` (built by
``Optimizer.__init__``, so step/state_dict hooks, profiling and LR schedulers work as for torch's own optimizers)
that *shares* the base optimizer's ``param_groups``, ``state`` and ``defaults`` (the same objects, also after
``load_state_dict``), and whose ``step()`` does:

1. **grads**: every ``p.grad`` is replaced by ``quantize(p.grad, policy.grad)``.
2. **states in**: packed states are decoded to fp32 tensors for the base optimizer.
3. **base step**: ``optimizer.step()`` (a closure, if given, is evaluated first, before the grads are quantized,
   so optimizers that evaluate their closure several times, such as LBFGS, are not supported).
4. **master**: every parameter with a gradient is rounded to ``policy.master`` (e.g. ``bf16:stochastic``). The
   parameters stay fp32 tensors holding values on the master grid (emulated storage); at ``wrap`` time they are
   rounded to the grid with round-to-nearest. Stochastic rounding uses this wrapper's own generator.
5. **states out**: each floating-point state tensor shaped like its parameter (``exp_avg``, ``exp_avg_sq``,
   ``momentum_buffer``, ...; never ``step``) whose spec (``policy.state_spec(name)``) is set is stored *packed*:
   ``state[p][name] = {"lowprec_packed": lowprec.encode(...).to_dict()}`` (uint8 codes, 4-bit formats two per
   byte, plus scales). Step counters and other non-float or differently shaped entries are left alone. States of
   parameters with fewer than ``policy.state_min_numel`` elements stay fp32 (torchao's rule: 4,096);
   ``policy.state_expand`` stores them with COAT's dynamic range expansion (``lowprec.encode(..., expand=n)``).

Steps 1, 2, 4 and 5 touch only parameters that have a gradient (torch optimizers skip the others; their states
stay packed, untouched). Zero-size parameters take part in the base step but are never quantized (nothing to
round; their states stay empty fp32 tensors).

**Non-finite states.** A state holding NaN or ±inf whose element format has no NaN (e2m1/FP4, FP6, int4/int8,
MX/NV FP4) cannot be stored without turning it into a number. Such a state stays an *unpacked fp32 tensor*, NaN
and inf included, for as long as it holds a non-finite value (``unpacked_states()`` lists them; telemetry
records the site every step with ``unpacked`` = its element count and its ``nan_count``/``inf_count``), and it
is packed again at the first step at which it is finite. The step itself always completes. (Deciding this
costs such formats one host read per state and step; formats with NaN pay nothing.) Formats with NaN
(e4m3, e5m2, bf16, ...) store non-finite states as their codes do (NaN stays NaN; ±inf as the spec saturates).

Between steps the optimizer state really is the packed codes, so ``state_dict()`` holds them (loadable with
``torch.load(weights_only=True)``) together with ``"lowprec"``: the policy string and the stochastic-rounding
generator state, so that ``load_state_dict`` resumes exactly (the following trajectory is bit-identical).
``decoded_state()`` yields every state tensor as fp32 for a run loop's statistics.

**Fused (default).** ``fused=True`` does each part of the step for many tensors at once (``lowprec.optim_batch``),
bit-identical to ``fused=False``, the per-tensor reference path (parameters, packed codes and scales, the
generator's random words and their order, telemetry rows; ``tests/lowprec/test_optim_fused.py`` and
``test_optim_segments.py``):

* gradients and master weights of up to 64k elements: one ``quantize_segments`` per group (unscaled, tensor or
  delayed scaling, 1-D blocks with any scale format, NVFP4 included; any rounding). Nearest rounding groups like
  tensors whatever their order; stochastic rounding groups runs of consecutive CPU tensors, so that the device's
  generator hands out the same words in the same order (a tensor kept per tensor ends a run);
* states of up to 64k elements with a *batchable* spec (round-to-nearest; unscaled, or blocks along the last axis
  with fp32 or E8M0 scales; a format with NaN: bf16, mxfp8, e4m3:block128, ...): one encode and one decode per
  group. Between steps the wrapper keeps the last encode's batch codes and scales: while every entry split from
  a batch is still in place (the same dict objects, codes and scales not modified), the next decode reads the
  batch as it is; and while the decoded states are still the views the decode handed out, the encode reads their
  buffer without concatenating them again. (Memory: one more copy of the small tensors' codes and scales; the
  caches are not pickled and ``load_state_dict`` drops them.)
* on unsampled steps with exact NaN/inf checks (``check_nonfinite=True``), one host read per part of the step.
* the state part of the step is *replayed* (``_StatePlan``): once a step has laid its batches out, the following
  steps decode each batch into the same fp32 buffer and write the new codes and scales into each state's existing
  tensors (as torch optimizers update their states in place; a ``state_dict()`` taken earlier holds these same
  tensors, so copy it to keep a snapshot), for as long as nothing changed between steps: the same parameters with
  gradients, the same state dicts and entries, every batched state still the packed dict, codes and scale this
  wrapper left (not modified: their version counters), the base step's states still the decoded views, the same
  telemetry. Anything else ends the replay for that step (the general path runs and lays the batches out again).
  The values, random words and telemetry are those of the general path.
* while a replay holds and the base optimizer is :class:`lowprec.adamw.NativeAdamW` (its
  ``defer_moment_decode``), the states above 64k whose ``exp_avg`` and ``exp_avg_sq`` are both e4m3 with fp32
  block scales along the rows of a 2-D parameter (``e4m3:block128``: fp8-all, fp8-states) are not decoded
  first: the base step's first pass decodes them block by block, updates them and encodes the results in L1
  (``lowprec.fast.adam_step``), and the encode takes those codes and scales (the values, codes and telemetry of
  decoding first and encoding after). A base step that cannot run natively decodes them first as usual.

Channel scaling, 2-D blocks, NVFP4/4-bit *states*, COAT expansion and tensors above 64k stay per tensor.
``wrap(..., fused=False)`` (or setting ``.fused = False`` at any time) turns all of it off.

Nested optimizers (``stosign.SignConverted``'s ``.base``): the wrapper quantizes the states of the optimizer it
wraps (SignConverted's bound ``G``); the nested base's own states (AdamW's moments inside SignConverted) stay
fp32, as the base keeps them (``decoded_state(nested=True)`` shows them).

Telemetry (``telemetry=Telemetry(...)``): sites ``optim:grad`` (role grad), ``optim:<state name>`` (role state,
including zero fractions of unquantized second moments), ``optim:master`` (role master, with
``lost_update_frac``: of the parameters whose unrounded update was nonzero, the fraction left unchanged by the
master rounding). ``step()`` calls ``telemetry.next_step()`` at its end. On unsampled steps the states' NaN/inf
checks follow ``Telemetry.check_nonfinite``: one host read for all states of the step (``True``), or none
(``"deferred"``).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterator

import torch

from lowprec.codecs import _SMALL as _SMALL_E4M3
from lowprec.codecs import Encoded, _spec_text, decode, element_scale, encode
from lowprec.codecs import _table as _code_table
from lowprec.fast import (PackedMoments, block_scaled_in_place, dense_cpu_f32, packed_moments_ok, stochastic_in_place,
                          tensor_scaled_in_place)
from lowprec.optim_batch import (
    BATCH_MAX_NUMEL,
    _row_spec,
    BatchReadback,
    batchable,
    decode_batch,
    decode_rows,
    decode_state,
    e4m3_rows,
    encode_rows,
    quantize_segments,
    segments_ok,
)
from lowprec.policy import PrecisionPolicy, is_identity
from lowprec.quantize import QuantSpec, Rounding, quantize, quantize_with_scale
from lowprec.rounding import saturation_limit
from lowprec.telemetry import Telemetry

__all__ = ["wrap", "LowPrecisionOptimizer", "state_bytes", "PACKED_KEY", "closure_loss"]

PACKED_KEY = "lowprec_packed"  # state[p][name] == {PACKED_KEY: Encoded.to_dict()} for a packed state


def _is_packed(value: Any) -> bool:
    return isinstance(value, dict) and PACKED_KEY in value


def _active(spec: QuantSpec | None) -> QuantSpec | None:
    """None for specs that are the identity (fp32, unscaled)."""
    return None if is_identity(spec) else spec


def _atleast_1d(t: torch.Tensor) -> torch.Tensor:
    """Scaling needs at least one dimension: a 0-dim tensor becomes shape (1,), others are untouched."""
    return t.reshape(1) if t.dim() == 0 else t


def _is_state_tensor(name: str, value: Any, p: torch.Tensor) -> bool:
    """A floating-point state tensor shaped like its parameter (the entries the wrapper may pack)."""
    return (name != "step" and isinstance(value, torch.Tensor) and value.is_floating_point()
            and value.shape == p.shape)


def _finite_flags(sums: list[torch.Tensor]) -> list[bool]:
    """``isfinite`` of each 0-dim tensor, read with one host transfer per device."""
    out: list[bool] = [True] * len(sums)
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(sums):
        by_device.setdefault(s.device, []).append(i)
    for idx in by_device.values():
        for i, ok in zip(idx, torch.isfinite(torch.stack([sums[i] for i in idx])).tolist()):
            out[i] = ok
    return out


def _same_codes(members: list[tuple]) -> bool:
    """True when the packed entries of an encoded batch still hold their codes and scales unmodified (the
    ``(..., enc, codes version, scale version)`` tuples ``_encode_states`` recorded)."""
    for m in members:
        enc, d = m[4], m[2][PACKED_KEY]
        if d["codes"] is not enc.codes or d["scale"] is not enc.scale or enc.codes._version != m[5]:
            return False
        if enc.scale is not None and enc.scale._version != m[6]:
            return False
    return True


def _decoded_of(item: list[Any]) -> torch.Tensor:
    """``decode(enc)`` of a state item of ``_encode_states`` (from its batch's readback where it has one)."""
    rb = item[5] if len(item) > 5 else None
    return decode(item[4]) if rb is None else rb[0].value(rb[1])


def state_bytes(state_dict: dict) -> int:
    """Bytes of all tensors in an optimizer ``state_dict()['state']`` (packed codes and scales included)."""
    def walk(v: Any) -> int:
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        return 0
    return walk(state_dict["state"])


class _Member:
    """One state of a planned group: where it lives (``st[name]``), its packed dict and ``Encoded`` (codes and
    scale updated in place each step), its fp32 view of the group's values, and the versions its codes and scale
    had after this wrapper last wrote them."""
    __slots__ = ("st", "name", "packed", "inner", "enc", "view", "versions")

    def __init__(self, st: dict, name: str, packed: dict, enc: Encoded, view: torch.Tensor) -> None:
        self.st, self.name, self.packed, self.inner, self.enc, self.view = st, name, packed, packed[PACKED_KEY], enc, view
        self.versions = self._versions()

    def _versions(self) -> tuple[int, int]:
        return self.enc.codes._version, -1 if self.enc.scale is None else self.enc.scale._version

    def intact(self) -> bool:
        """Still in place and unmodified: the same packed dict holding the same codes and scale, not written since."""
        inner = self.inner
        return (self.st.get(self.name) is self.packed and inner["codes"] is self.enc.codes
                and inner["scale"] is self.enc.scale and self._versions() == self.versions)


class _Group:
    """A batch of states encoded together (one ``encode_rows`` group), kept between steps: its codes and scales
    as one batch (what the next decode reads) and split into each state's own tensors, and the fp32 values buffer
    the decoded states are views of."""
    __slots__ = ("spec", "row_spec", "dtype", "small", "codes", "scale", "values", "code_rows", "scale_rows",
                 "batch_code_rows", "batch_scale_rows", "members", "encs")

    def __init__(self, spec: QuantSpec, codes: torch.Tensor, scale: torch.Tensor | None, values: torch.Tensor,
                 members: list[_Member]) -> None:
        n = codes.shape[1]
        self.spec, self.row_spec, self.dtype = spec, _row_spec(spec, n), members[0].enc.dtype
        self.small = max(m.enc.codes.numel() for m in members) < _SMALL_E4M3
        self.codes, self.scale, self.values, self.members = codes, scale, values, members
        self.encs = [m.enc for m in members]
        ks = [m.enc.codes.numel() // n for m in members]
        self.code_rows = [m.enc.codes.view(-1, n) for m in members]
        self.batch_code_rows = list(codes.split(ks))
        if scale is not None:
            nb = scale.shape[1]
            self.scale_rows = [m.enc.scale.view(-1, nb) for m in members]
            self.batch_scale_rows = list(scale.split(ks))


class _StatePlan:
    """The state part of a fused step (decode, then encode after the base step) as the last general step laid it
    out, replayed while it still holds: the same parameters with gradients, the same state dicts with the same
    entries, every batched state still the packed dict and codes this wrapper left (unmodified), the same
    telemetry. Each step's encode then writes its codes and scales into the states' existing tensors, as torch
    optimizers update their states in place, instead of new dicts of new tensors; values, random words and
    telemetry are those of the general path. ``order``: the states in the general path's order (telemetry's)."""
    __slots__ = ("params", "lens", "order", "groups", "tel", "zero_states", "decoded", "buffers")

    def __init__(self, params: list[torch.Tensor], lens: list[tuple[torch.Tensor, dict, int]], order: list[tuple],
                 groups: list[_Group], tel: Telemetry | None) -> None:
        self.params, self.lens, self.order, self.groups = params, lens, order, groups
        self.tel, self.zero_states = tel, (tel.zero_states if tel is not None else None)
        self.decoded = False   # the states are this plan's views now (between its decode and its encode)
        # (id(state dict), name) -> (that dict, the fp32 buffer its per-tensor state is decoded into; kept between
        # steps: fresh buffers every step cost page faults, ~3 ms a step at d_model 256 for 1.4M values a moment)
        self.buffers: dict[tuple[int, str], tuple[dict, torch.Tensor]] = {}

    def buffer(self, st: dict, name: str, p: torch.Tensor) -> torch.Tensor:
        """The fp32 buffer of ``st[name]`` (parameter ``p``'s shape, on the CPU), made on first use."""
        key = (id(st), name)
        kept = self.buffers.get(key)
        if kept is None or kept[0] is not st or kept[1].shape != p.shape:
            kept = self.buffers[key] = (st, torch.empty(p.shape))
        return kept[1]

    def same_layout(self, state: dict) -> bool:
        for p, st, n in self.lens:
            if state.get(p) is not st or (st is not None and len(st) != n):
                return False
        return True


def _shared(name: str, doc: str) -> property:
    """An attribute of the base optimizer, shared (the same object). During ``Optimizer.__init__`` (before
    ``_sharing`` is set) torch's setup writes to a private local copy that is dropped afterwards."""
    local = f"_init_{name}"

    def get(self: "LowPrecisionOptimizer") -> Any:
        if self.__dict__.get("_sharing"):
            return getattr(self.optimizer, name)
        return self.__dict__[local]

    def set_(self: "LowPrecisionOptimizer", value: Any) -> None:
        if self.__dict__.get("_sharing"):
            setattr(self.optimizer, name, value)
        else:
            self.__dict__[local] = value

    return property(get, set_, doc=doc)


class LowPrecisionOptimizer(torch.optim.Optimizer):
    """See module docstring. Use ``wrap(optimizer, policy)`` to build one."""

    param_groups = _shared("param_groups", "The base optimizer's param_groups (shared).")
    state = _shared("state", "The base optimizer's state (shared; packed entries between steps).")
    defaults = _shared("defaults", "The base optimizer's defaults (shared).")

    def __init__(self, optimizer: torch.optim.Optimizer, policy: PrecisionPolicy | str, *,
                 telemetry: Telemetry | None = None, seed: int = 0, fused: bool = True) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"wrap needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, LowPrecisionOptimizer):
            raise TypeError("this optimizer is already wrapped")
        if telemetry is not None and not isinstance(telemetry, Telemetry):
            raise TypeError(f"telemetry must be a lowprec.telemetry.Telemetry, got {type(telemetry).__name__}")
        if isinstance(seed, bool) or not hasattr(seed, "__index__"):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        seed = operator.index(seed)
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {fused!r}")
        self.optimizer = optimizer
        self.fused = fused
        self.policy = PrecisionPolicy.parse(policy)
        self.telemetry = telemetry
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._gen_of: dict[torch.device, torch.Generator] = {}   # _generators by device object (lookup speed)
        self._grad_spec = _active(self.policy.grad)
        self._master_spec = _active(self.policy.master)
        self._state_specs: dict[str, QuantSpec | None] = {}
        self._spec_texts: dict[str, str] = {}
        # fused: batches of the last encode (codes/scales; reused by the next decode while the states still hold
        # the codes split from them) and of this step's decode (the fp32 buffer the states are views of)
        self._encoded: dict[tuple, tuple] = {}
        self._decoded: dict[tuple, tuple] = {}
        self._plan: _StatePlan | None = None      # fused: the state part of the step, replayed while it holds
        # replay with a NativeAdamW base: id(state dict) -> (the moments the base step decodes and encodes, the m and
        # v buffers it writes, the state dict, the parameter); for one step
        self._moments: dict[int, tuple[PackedMoments, torch.Tensor, torch.Tensor, dict, torch.Tensor]] = {}
        self._expand = self.policy.state_expand   # COAT dynamic range expansion of packed states (0: none)
        self._sharing = False
        # torch's own setup (hook dicts, step profiling, group checks) on copies of the base's groups ...
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        # ... then share the base's objects instead of those copies
        self._sharing = True
        for name in ("param_groups", "state", "defaults"):
            self.__dict__.pop(f"_init_{name}", None)
        self._round_to_master(self._params())

    # ------------------------------------------------------------------ helpers
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _gen(self, device: torch.device) -> torch.Generator:
        g = self._gen_of.get(device)
        if g is None:
            key = str(device)
            g = self._generators.get(key)
            if g is None:
                g = self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
            self._gen_of[device] = g
        return g

    def _state_spec(self, name: str, p: torch.Tensor | None = None) -> QuantSpec | None:
        """The spec of state ``name`` (of parameter ``p``: None below the policy's ``state_min_numel``)."""
        if name not in self._state_specs:
            self._state_specs[name] = spec = _active(self.policy.state_spec(name))
            self._spec_texts[name] = str(spec)
        if p is not None and p.numel() < self.policy.state_min_numel:
            return None
        return self._state_specs[name]

    def _round_to_master(self, params: list[torch.Tensor]) -> None:
        """Put new parameters on the master grid (round-to-nearest; no-op without a master spec)."""
        if self._master_spec is not None:
            with torch.no_grad():
                for p in params:
                    if p.numel():
                        p.copy_(quantize(_atleast_1d(p), self._master_spec, rounding="nearest").reshape(p.shape))

    def __repr__(self) -> str:
        return f"LowPrecisionOptimizer({self.policy}, {self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults/state/param_groups: here they live in the base optimizer
        # (the batch caches are left out: a copy starts without them, as after load_state_dict)
        return {**self.__dict__, "_encoded": {}, "_decoded": {}, "_gen_of": {}, "_plan": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in ("_encoded", "_decoded", "_gen_of", "_spec_texts"):   # (pickled before these existed)
            self.__dict__.setdefault(name, {})
        self.__dict__.setdefault("_plan", None)
        self._spec_texts.update({k: str(v) for k, v in self._state_specs.items() if k not in self._spec_texts})
        self._patch_step_function()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self.__dict__.get("_sharing"):
            super().add_param_group(param_group)  # during Optimizer.__init__: torch's checks, local copy
            return
        self.optimizer.add_param_group(param_group)
        self._round_to_master(self.param_groups[-1]["params"])

    # ------------------------------------------------------------------ reading the state
    def decoded_state(self, *, nested: bool = False) -> Iterator[tuple[torch.Tensor, str, torch.Tensor]]:
        """``(param, name, values)`` for every state tensor (packed or floating-point, shaped like its
        parameter; never ``step``), in param-group order; ``values`` is fp32 with the parameter's shape: a fresh
        decoded tensor for packed states, the live tensor (do not modify it) for unpacked ones.
        ``nested=True`` continues with the states of optimizers nested inside the wrapped one (``.base`` of
        ``stosign.SignConverted``, ``.optimizer`` of other wrappers), which the wrapper does not quantize."""
        seen: set[int] = set()
        opt: Any = self.optimizer
        while isinstance(opt, torch.optim.Optimizer) and id(opt) not in seen:
            seen.add(id(opt))
            for p in [p for g in opt.param_groups for p in g["params"]]:
                st = opt.state.get(p)
                for name, value in (st or {}).items():
                    if _is_packed(value):
                        yield p, name, decode(Encoded.from_dict(value[PACKED_KEY])).to(p.device).reshape(p.shape)
                    elif _is_state_tensor(name, value, p):
                        yield p, name, value
            if not nested:
                return
            opt = getattr(opt, "base", None) or getattr(opt, "optimizer", None)

    def unpacked_states(self) -> list[tuple[torch.Tensor, str]]:
        """``(param, name)`` of the states held unpacked now because they hold NaN/inf that their format cannot
        store (module docstring); empty in a healthy run."""
        out = []
        for p in self._params():
            for name, value in (self.state.get(p) or {}).items():
                spec = self._state_spec(name, p) if _is_state_tensor(name, value, p) else None
                if spec is not None and p.numel() and not bool(torch.isfinite(value).all()):
                    out.append((p, name))
        return out

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure_loss(closure)
        tel = self.telemetry
        sampling = tel is not None and tel.sampling
        params = [p for p in self._params() if p.grad is not None]
        live = [p for p in params if p.numel()]  # zero-size parameters: nothing to quantize

        if self._grad_spec is not None:
            self._quantize_grads(live, tel)
        # only parameters with a gradient take part in the step (torch optimizers skip the others), so only
        # their states are decoded and re-encoded; the others stay packed untouched
        self._moments = {}
        self._decode_states(params)

        olds = [p.detach().clone() for p in live] if (sampling and self._master_spec is not None) else None
        if self._moments:
            self._step_deferred()
        else:
            self.optimizer.step()
        if self._master_spec is not None:
            self._round_master(live, tel, olds)
        self._encode_states(live, tel)
        self._moments = {}
        if tel is not None:
            tel.next_step()
        return loss

    def _batches(self, tensors: list[torch.Tensor], spec: QuantSpec) -> list[list[int]]:
        """Indices of ``tensors`` (at least 1-dim, non-empty) in the groups to quantize together, in processing
        order (``fused``: :func:`lowprec.optim_batch.quantize_segments`; one-element groups per tensor).
        Stochastic rounding draws from the device's generator in tensor order, so its groups are runs of
        consecutive tensors (a tensor kept per tensor ends a run); nearest rounding draws nothing, so like
        tensors form one group whatever their order."""
        if not self.fused or not segments_ok(spec):
            return [[i] for i in range(len(tensors))]
        sto = spec.rounding == Rounding.STOCHASTIC
        out: list[list[int]] = []
        groups: dict[tuple, list[int]] = {}
        run: list[int] | None = None
        run_key = None
        for i, t in enumerate(tensors):
            key = (t.device, t.dtype)
            if t.numel() > BATCH_MAX_NUMEL or (sto and t.device.type != "cpu"):
                out.append([i])
                run = None
            elif sto:
                if run is None or run_key != key:
                    run, run_key = [i], key
                    out.append(run)
                else:
                    run.append(i)
            else:
                grp = groups.get(key)
                if grp is None:
                    grp = groups[key] = []
                    out.append(grp)
                grp.append(i)
        return out

    def _quantize_all(self, xs: list[torch.Tensor], spec: QuantSpec, gens: list[torch.Generator],
                      scales_too: bool = True) -> tuple[list[torch.Tensor], list[Any]]:
        """``quantize_with_scale(xs[i], spec, gens[i])`` for every i, in order (batched where ``fused``;
        bit-identical): the values, and per tensor its scale or a ``(Segments, j)`` pair that yields it
        (``scales_too=False``: ``quantize``, no scales, for tensors quantized alone)."""
        qs: list[Any] = [None] * len(xs)
        scales: list[Any] = [None] * len(xs)
        for idx in self._batches(xs, spec):
            if len(idx) > 1:
                seg = quantize_segments([xs[i] for i in idx], spec, gens[idx[0]])
                if seg is not None:
                    for j, i in enumerate(idx):
                        qs[i], scales[i] = seg.q[j], (seg, j)
                    continue
            for i in idx:
                if scales_too:
                    qs[i], scales[i] = quantize_with_scale(xs[i], spec, generator=gens[i])
                else:
                    qs[i] = quantize(xs[i], spec, generator=gens[i])
        return qs, scales

    def _in_place(self, xs: list[torch.Tensor], spec: QuantSpec, gens: list[torch.Generator]) -> bool:
        """``x.copy_(quantize(x, spec, generator=gens[i]))`` for every ``xs[i]``, in order, by one native call
        where one applies (``fused``; fp32 tensor scaling with nearest / toward-zero rounding, unscaled stochastic
        rounding from one CPU generator, or MX / NVFP4 blocks tiling the last axis;
        :func:`lowprec.fast.tensor_scaled_in_place`, :func:`lowprec.fast.stochastic_in_place`,
        :func:`lowprec.fast.block_scaled_in_place`): the same bits, no batch buffer. False, with nothing changed,
        elsewhere."""
        if not self.fused or not xs:
            return False
        sc = spec.scaling
        if sc is None and spec.rounding == Rounding.STOCHASTIC:
            if any(g is not gens[0] for g in gens) or (spec.saturate and
                                                        saturation_limit(spec.format, torch.float32) is not None):
                return False   # (quantize would clamp to a limit after rounding: left to it)
            return stochastic_in_place(xs, spec.format, saturate=spec.saturate, flush=spec.flush_subnormals,
                                       rand_bits=spec.rand_bits, generator=gens[0])
        if sc is not None and sc.mode == "tensor":
            return tensor_scaled_in_place(xs, spec) is not None
        if sc is not None and sc.mode == "block" and all(g is gens[0] for g in gens):
            return block_scaled_in_place(xs, spec, gens[0])
        return False

    @staticmethod
    def _scale(s: Any) -> torch.Tensor | None:
        return s[0].scale(s[1]) if isinstance(s, tuple) else s

    def _quantize_grads(self, params: list[torch.Tensor], tel: Telemetry | None) -> None:
        spec = self._grad_spec
        for p in params:
            if p.grad.is_sparse:
                raise ValueError("lowprec.optim.wrap does not quantize sparse gradients")
        grads = [_atleast_1d(p.grad) for p in params]
        gens = [self._gen(p.device) for p in params]  # created even when unused, so state_dict lists it
        if (tel is None or not tel.wants() or (tel.deferred and not tel.sampling)) and self._in_place(grads, spec, gens):
            # nothing reads the unquantized gradients on such a step: quantized where they are, one native call
            if tel is not None and tel.wants():
                tel.flag_many([("optim:grad", g) for g in grads])   # the deferred checks record() would make
            return
        qs, scales = self._quantize_all(grads, spec, gens)
        if tel is not None and tel.wants() and not tel.sampling and tel.deferred:
            # what record() does on such a step: a deferred check of q, nothing else
            tel.flag_many([("optim:grad", q) for q in qs])
        elif tel is not None and tel.wants():
            todo = range(len(params))
            if not tel.sampling and not tel.deferred:
                # record() would only check q.sum() for NaN/inf: the same sums, read with one host transfer;
                # the tensors whose sum is not finite are recorded (a full row), as record() would
                finite = _finite_flags([q.sum() for q in qs])
                todo = [i for i in todo if not finite[i]]
            text = _spec_text(spec)
            for i in todo:  # in parameter order (telemetry sums in that order)
                tel.record("optim:grad", "grad", grads[i], qs[i], scale=self._scale(scales[i]),
                           fmt_max=spec.format.max, fmt=text)
        for p, q in zip(params, qs):
            g = p.grad
            g.copy_(q if q.shape == g.shape else q.reshape(g.shape))

    def _round_master(self, params: list[torch.Tensor], tel: Telemetry | None,
                      olds: list[torch.Tensor] | None) -> None:
        spec = self._master_spec
        sampling = olds is not None
        xs = [_atleast_1d(p) for p in params]   # (under no_grad: no autograd history)
        gens = [self._gen(p.device) for p in params]
        if not sampling and self._in_place(xs, spec, gens):
            return
        # sampled steps keep the unrounded values for telemetry (the quantized values are new tensors, so the
        # parameters themselves still hold them until copied)
        qs, _ = self._quantize_all(xs, spec, gens, scales_too=False)
        unrounded = [p.detach().clone() for p in params] if sampling else None
        text = _spec_text(spec)
        for i, p in enumerate(params):
            q = qs[i]
            p.copy_(q if q.shape == p.shape else q.reshape(p.shape))
            if sampling:
                tel.record_update("optim:master", olds[i], unrounded[i], p, fmt=text)
                tel.record("optim:master", "master", unrounded[i], p, fmt_max=spec.format.max, fmt=text)

    def _decode_states(self, params: list[torch.Tensor]) -> None:
        # ``cache``: the batches encoded at the previous step, with the packed entries split from them. A batch
        # whose entries are all still in place (the same dict objects, codes and scales unmodified) is decoded
        # from its batch codes as they are; the rest is read entry by entry and grouped again. ``_decoded``: the
        # buffers decoded now (the states are views of them) for this step's encode.
        if self._decode_planned(params):
            return
        cache, self._encoded = self._encoded, {}
        self._decoded = {}
        fused = self.fused
        where = {id(m[2]): (key, j) for key, kept in cache.items() for j, m in enumerate(kept[2])} if fused else {}
        found: dict[tuple, list[tuple]] = {}
        groups: dict[tuple, list[tuple[dict, str, torch.Tensor, Encoded]]] = {}
        for p in params:
            st = self.state.get(p)
            if not st:
                continue
            for name, value in list(st.items()):
                if not _is_packed(value):
                    continue
                hit = where.get(id(value))
                if hit is not None:
                    m = cache[hit[0]][2][hit[1]]
                    if m[0] is st and m[1] == name and m[3] is p:
                        found.setdefault(hit[0], []).append((hit[1], m))
                        continue
                self._decode_entry(st, name, p, value, groups, fused)
        for key, hits in found.items():
            codes, scale, members = cache[key]
            if len(hits) == len(members) and all(j == i for i, (j, _) in enumerate(hits)) and _same_codes(members):
                self._decode_group(key, [(m[0], m[1], m[3], m[4]) for m in members], codes, scale)
            else:
                for _, m in hits:
                    self._decode_entry(m[0], m[1], m[3], m[2], groups, fused)
        for key, entries in groups.items():
            self._decode_group(key, entries, None, None)

    def _decode_planned(self, params: list[torch.Tensor]) -> bool:
        """The decode of ``self._plan`` if it still holds (``_StatePlan``); False (and the plan dropped) if not."""
        plan, self._plan = self._plan, None
        if plan is None or not self.fused:
            return False
        live = [p for p in params if p.numel()]     # (the parameters the encode saw)
        if len(live) != len(plan.params):
            return False
        for a, b in zip(live, plan.params):
            if a is not b:
                return False
        if not plan.same_layout(self.state):
            return False
        for g in plan.groups:
            for m in g.members:
                if not m.intact():
                    return False
        singles = [(st, name, p, st.get(name)) for kind, name, st, p, _ in plan.order if kind == "single"]
        for *_, value in singles:
            if not _is_packed(value):
                return False
        for g in plan.groups:
            decode_batch(g.codes, g.scale, g.row_spec, g.dtype, g.small, out=g.values)
            for m in g.members:
                m.st[m.name] = m.view
        deferred = self._defer_moments(singles, plan)
        for st, name, p, value in singles:
            if id(st) not in deferred:
                enc = Encoded.from_dict(value[PACKED_KEY])
                out = plan.buffer(st, name, p) if e4m3_rows(enc) and enc.shape == p.shape else None
                st[name] = decode_state(enc, out).to(p.device).reshape(p.shape)
        self._encoded, self._decoded = {}, {}
        plan.decoded, self._plan = True, plan
        return True

    def _defer_moments(self, singles: list[tuple], plan: _StatePlan) -> set[int]:
        """Of a replay's per-tensor states, the AdamW moments a NativeAdamW base step can decode and encode
        itself (module docstring, "Fused"): each such parameter's ``exp_avg`` / ``exp_avg_sq`` become the plan's
        buffers for them (values not yet written) and ``self._moments`` holds their codes. The ids of those parameters' state dicts."""
        if self._expand or getattr(self.optimizer, "defer_moment_decode", None) is None:
            return set()
        pairs: dict[int, list] = {}
        for st, name, p, value in singles:
            if name in ("exp_avg", "exp_avg_sq"):
                pairs.setdefault(id(st), [st, p, {}])[2][name] = value
        for key, (st, p, vals) in pairs.items():
            if len(vals) != 2 or not dense_cpu_f32(p) or p.dim() != 2:
                continue
            m, v = (Encoded.from_dict(vals[k][PACKED_KEY]) for k in ("exp_avg", "exp_avg_sq"))
            if not all(e.dtype == torch.float32 and e.shape == p.shape and not e.packed and e.global_scale is None
                       and e.expand_k is None and packed_moments_ok(e.codes, e.scale, e.spec, p.shape)
                       for e in (m, v)) or _spec_text(m.spec) != _spec_text(v.spec):
                continue
            pm = PackedMoments((m.codes, v.codes), (m.scale, v.scale), m.spec, _code_table(m.spec.format, p.device))
            bm, bv = plan.buffer(st, "exp_avg", p), plan.buffer(st, "exp_avg_sq", p)
            st["exp_avg"], st["exp_avg_sq"] = bm, bv
            self._moments[key] = (pm, bm, bv, st, p)
        return set(self._moments)

    def _step_deferred(self) -> None:
        """The base step with ``self._moments`` handed to it (``NativeAdamW.defer_moment_decode``); were it not
        native, it first decodes them as the replay would have."""
        moments = list(self._moments.values())

        def decode() -> None:
            for pm, bm, bv, st, p in moments:
                for j, (name, buf) in enumerate((("exp_avg", bm), ("exp_avg_sq", bv))):
                    st[name] = decode_state(Encoded(pm.codes[j], pm.scales[j], pm.spec, p.shape, torch.float32), buf)

        self.optimizer.defer_moment_decode({p: pm for pm, _, _, _, p in moments}, decode)
        try:
            self.optimizer.step()
        finally:
            self.optimizer.defer_moment_decode(None)

    def _encoded_by_base(self, st: dict, name: str, value: torch.Tensor, spec: QuantSpec) -> Encoded | None:
        """The encoding of moment ``st[name]`` (now ``value``) that the base step wrote (``_defer_moments``), or
        None: not deferred, the step was not native, or the base step replaced the buffer."""
        mo = self._moments.get(id(st))
        if mo is None or name not in ("exp_avg", "exp_avg_sq") or not mo[0].done:
            return None
        j = 0 if name == "exp_avg" else 1
        if value is not mo[1 + j]:
            return None
        return Encoded(mo[0].codes_out[j], mo[0].scales_out[j], spec, value.shape, value.dtype)

    def _decode_entry(self, st: dict, name: str, p: torch.Tensor, value: dict, groups: dict, fused: bool) -> None:
        """Decode one packed state now, or add it to its batch in ``groups``."""
        d = value[PACKED_KEY]
        enc = Encoded.from_dict(d)
        if (fused and p.numel() <= BATCH_MAX_NUMEL and not enc.packed and enc.global_scale is None
                and enc.expand_k is None and batchable(enc.spec) and enc.codes.device == p.device):
            groups.setdefault((d["spec"], enc.dtype, p.device, enc.shape[-1]), []).append((st, name, p, enc))
        else:
            st[name] = decode_state(enc).to(p.device).reshape(p.shape)

    def _decode_group(self, key: tuple, entries: list[tuple], codes: torch.Tensor | None,
                      scale: torch.Tensor | None) -> None:
        out: dict[str, torch.Tensor] = {}
        values = decode_rows([e[3] for e in entries], codes=codes, scale=scale, keep=out)
        views = []
        for (st, name, p, _), v in zip(entries, values):
            v = v if v.shape == p.shape else v.reshape(p.shape)
            st[name] = v
            views.append(v)
        self._decoded[key] = (out["values"], views)

    def _encode_states(self, params: list[torch.Tensor], tel: Telemetry | None) -> None:
        """Encode the states of ``params`` (batched where ``fused``), then record telemetry in state order."""
        sampling = tel is not None and tel.sampling
        checking = tel is not None and not sampling and tel.check_nonfinite
        if self._encode_planned(tel, sampling, checking):
            return
        todo: list[list[Any]] = []        # [kind, name, value, spec, enc] in state order, for telemetry
        groups: dict[tuple, list[tuple[dict, str, torch.Tensor, list[Any]]]] = {}
        zero_states = tel.zero_states if tel is not None else ()
        batch = self.fused and not self._expand
        # for a _StatePlan of this layout: the states in todo order, and each parameter's state dict and size
        plannable = batch
        order: list[tuple] = []
        lens: list[tuple[torch.Tensor, dict, int]] = []
        for p in params:
            st = self.state.get(p)
            lens.append((p, st, len(st) if st else 0))
            if not st:
                continue
            for name, value in list(st.items()):
                if not _is_state_tensor(name, value, p):
                    continue
                spec = self._state_spec(name, p)
                if spec is None:
                    if name in zero_states:
                        todo.append(["zeros", name, value, None, None])
                        order.append(("zeros", name, st, p, None))
                    continue
                if not spec.format.has_nan and not bool(torch.isfinite(value).all()):
                    # the format would turn NaN/inf into numbers (or refuse them): keep fp32, visibly
                    todo.append(["unpacked", name, value, spec, None])
                    plannable = False
                    continue
                x = _atleast_1d(value)
                item = ["state", name, value, spec, None]
                todo.append(item)
                gen = self._gen(p.device)  # created even when unused, so state_dict lists it either way
                if batch and x.numel() <= BATCH_MAX_NUMEL and batchable(spec):
                    key = (self._spec_texts[name], x.dtype, x.device, x.shape[-1])
                    order.append(("group", name, st, p, (key, len(groups.get(key, ())))))
                    groups.setdefault(key, []).append((st, name, x, item, p))
                else:
                    item[4] = encode(x, spec, generator=gen, expand=self._expand)
                    st[name] = {PACKED_KEY: item[4].to_dict()}
                    order.append(("single", name, st, p, spec))
                    plannable = plannable and spec.format.has_nan   # (never kept unpacked)
        decoded, self._decoded = self._decoded, {}
        planned: dict[tuple, _Group] = {}
        for key, entries in groups.items():
            spec = entries[0][3][3]
            xs = [e[2] for e in entries]
            values = [e[3][2] for e in entries]     # (xs but 0-dim states, which are reshaped views of these)
            dec = decoded.get(key)
            big = None
            if dec is not None and len(dec[1]) == len(xs) and all(a is b for a, b in zip(values, dec[1])):
                big = dec[0]          # the states still are the views of this step's decoded buffer, in order
            kept: dict[str, torch.Tensor] = {}
            encs = encode_rows(xs, spec, big=big, keep=kept)
            if encs is None:  # unexpected layout: per tensor (nearest rounding: no generator is consumed)
                encs = [encode(x, spec) for x in xs]
            members = []
            readback = BatchReadback(encs, kept["codes"], kept["scale"]) if (kept and tel is not None) else None
            for j, ((st, name, _, item, p), enc) in enumerate(zip(entries, encs)):
                item[4] = enc
                if readback is not None:
                    item.append((readback, j))
                st[name] = packed = {PACKED_KEY: enc.to_dict()}
                members.append((st, name, packed, p, enc, enc.codes._version,
                                None if enc.scale is None else enc.scale._version))
            if kept:
                self._encoded[key] = (kept["codes"], kept["scale"], members)
            if plannable and kept and big is not None:
                planned[key] = _Group(spec, kept["codes"], kept["scale"], big,
                                      [_Member(m[0], m[1], m[2], m[4], v) for m, v in zip(members, values)])
            else:
                plannable = False
        if plannable:
            keys = list(planned)
            order = [o if o[0] != "group" else o[:4] + ((keys.index(o[4][0]), o[4][1]),) for o in order]
            self._plan = _StatePlan([p for p, *_ in lens], lens, order, [planned[k] for k in keys], tel)
        if tel is not None:
            self._record_states(tel, todo, sampling, checking)

    def _encode_planned(self, tel: Telemetry | None, sampling: bool, checking: bool | str) -> bool:
        """The encode of ``self._plan`` after its decode, if it still holds (the base step left the states in
        place, the same telemetry): the general path's codes, scales, random words and telemetry, written into
        the states' existing tensors. False (and the plan dropped) otherwise."""
        plan = self._plan
        if plan is None:
            return False
        if (not plan.decoded or tel is not plan.tel or (tel is not None and tel.zero_states is not plan.zero_states)
                or not plan.same_layout(self.state)):
            self._plan = None
            return False
        plan.decoded = False
        for g in plan.groups:
            for m in g.members:
                if m.st.get(m.name) is not m.view:   # the base step replaced the tensor
                    self._plan = None
                    return False
        readbacks = [BatchReadback(g.encs, g.codes, g.scale) for g in plan.groups] if tel is not None else None
        todo: list[list[Any]] = []
        for kind, name, st, p, ref in plan.order:
            value = st[name]
            if kind == "zeros":
                todo.append(["zeros", name, value, None, None])
            elif kind == "single":
                item = ["state", name, value, ref, None]
                item[4] = (self._encoded_by_base(st, name, value, ref)
                           or encode(_atleast_1d(value), ref, generator=self._gen(p.device), expand=self._expand))
                st[name] = {PACKED_KEY: item[4].to_dict()}
                todo.append(item)
            else:
                g = plan.groups[ref[0]]
                item = ["state", name, value, g.spec, g.members[ref[1]].enc]
                if readbacks is not None:
                    item.append((readbacks[ref[0]], ref[1]))
                todo.append(item)
        for g in plan.groups:
            enc = encode(g.values, g.row_spec)
            g.codes.copy_(enc.codes)
            torch._foreach_copy_(g.code_rows, g.batch_code_rows)
            if g.scale is not None:
                g.scale.copy_(enc.scale)
                torch._foreach_copy_(g.scale_rows, g.batch_scale_rows)
            for m in g.members:
                m.st[m.name] = m.packed
                m.versions = m._versions()
        if tel is not None:
            self._record_states(tel, todo, sampling, checking)
        return True

    def _record_states(self, tel: Telemetry, todo: list[list[Any]], sampling: bool, checking: bool) -> None:
        exact = checking and not tel.deferred
        zeros_ok: dict[int, bool] = {}
        checks: list[tuple[list[Any], list[torch.Tensor]]] = []
        if exact:
            # unsampled, NaN/inf checked now: the sums record()/record_zeros() would read one by one, read with
            # one host transfer; only the non-finite ones are recorded (a full row), in the order they would be
            zeros = [item for item in todo if item[0] == "zeros"]
            states = [item for item in todo if item[0] == "state"]
            sums = [z[2].sum() for z in zeros]
            for item in states:
                # non-finite if the state was, or (only possible without saturation in a format with
                # inf/NaN) its encoding overflowed to inf/NaN
                spec = item[3]
                ts = [item[2]]
                if not spec.saturate and (spec.format.has_inf or spec.format.has_nan):
                    ts.append(_decoded_of(item))
                checks.append((item, [t.sum() for t in ts]))
            finite = _finite_flags(sums + [t for _, ss in checks for t in ss]) if (sums or checks) else []
            zeros_ok = {id(z): ok for z, ok in zip(zeros, finite)}
            finite = finite[len(zeros):]
        deferred = checking and tel.deferred    # (unsampled) the checks record()/record_zeros() would make, batched
        flags: list[tuple[str, torch.Tensor]] = []
        for item in todo:
            kind, name, value, spec = item[:4]
            if deferred and kind in ("zeros", "state"):
                flags.append((f"optim:{name}", value))
                if kind == "state" and not spec.saturate and (spec.format.has_inf or spec.format.has_nan):
                    flags.append((f"optim:{name}", _decoded_of(item)))
                continue
            tel.flag_many(flags)   # (in execution order with the rows below)
            flags = []
            if kind == "zeros":
                if not zeros_ok.get(id(item), False):
                    tel.record_zeros(f"optim:{name}", "state", value, fmt="fp32")
            elif kind == "unpacked":
                tel.record(f"optim:{name}", "state", value, value, fmt_max=spec.format.max, fmt=str(spec),
                           unpacked=True)
            elif sampling:
                self._record_state(tel, item)
        tel.flag_many(flags)
        i = 0
        for item, ss in checks:   # full rows for the non-finite states
            if not all(finite[i:i + len(ss)]):
                self._record_state(tel, item)
            i += len(ss)

    @staticmethod
    def _record_state(tel: Telemetry, item: list[Any]) -> None:
        """Record state ``item`` (``[kind, name, value, spec, enc, (batch readback, j) or None]``)."""
        _, name, value, spec, enc = item[:5]
        q = _decoded_of(item)
        value = value.reshape(q.shape)
        scale = None
        if spec.scaling is not None and enc.expand_k is None:   # the scale per element, for the saturation
            # count: the encoding's own (expanded states: their scales apply to sign(x)|x/c|^k, not to x)
            rb = item[5] if len(item) > 5 else None
            # (what quantize_with_scale(value, spec) computes again)
            scale = element_scale(enc, q) if rb is None else rb[0].element_scale(rb[1])
        tel.record(f"optim:{name}", "state", value, q, scale=scale, fmt_max=spec.format.max, fmt=_spec_text(spec))

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict()`` (packed states as their ``to_dict()``) plus ``"lowprec"``:
        policy, seed and generator states. Hooks registered on this wrapper run as in torch."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.optimizer.state_dict()
        sd["lowprec"] = {
            "policy": str(self.policy),
            "seed": self.seed,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` of a wrapper with the same policy (ValueError otherwise): the next steps
        are exactly those the saved optimizer would have taken. Hooks registered on this wrapper run as in torch."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        sd = dict(state_dict)
        extra = sd.pop("lowprec", None)
        if extra is not None and extra.get("policy") != str(self.policy):
            raise ValueError(f"state_dict was saved under policy {extra.get('policy')!r}, "
                             f"this optimizer uses {str(self.policy)!r}")
        # The base optimizer would cast packed uint8 codes to the parameter dtype (and choke on strings):
        # hand it the plain entries only and restore the packed ones here.
        packed: dict[Any, dict[str, Any]] = {}
        plain_state: dict[Any, dict[str, Any]] = {}
        for pid, st in sd["state"].items():
            plain_state[pid] = {k: v for k, v in st.items() if not _is_packed(v)}
            packed[pid] = {k: v for k, v in st.items() if _is_packed(v)}
        sd["state"] = plain_state
        self._encoded, self._decoded, self._plan = {}, {}, None
        self.optimizer.load_state_dict(sd)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        id_to_param = dict(zip(saved_ids, self._params()))
        for pid, entries in packed.items():
            p = id_to_param[pid]
            for name, value in entries.items():
                inner = {k: (v.detach().clone().to(p.device) if isinstance(v, torch.Tensor) else v)
                         for k, v in value[PACKED_KEY].items()}
                self.state[p][name] = {PACKED_KEY: inner}
        if extra is not None:
            self.seed = int(extra.get("seed", self.seed))
            self._generators = {}
            self._gen_of = {}
            for key, gstate in extra.get("generators", {}).items():
                g = torch.Generator(device=key).manual_seed(self.seed)
                g.set_state(gstate)
                self._generators[key] = g
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """A torch optimizer step's closure, evaluated with autograd on (None without one): its loss."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def wrap(optimizer: torch.optim.Optimizer, policy: PrecisionPolicy | str, *,
         telemetry: Telemetry | None = None, seed: int = 0, fused: bool = True) -> LowPrecisionOptimizer:
    """Wrap ``optimizer`` so its gradients, states and master weights follow ``policy`` (module docstring).
    ``seed`` seeds the stochastic-rounding generator (one per device), saved in ``state_dict``. ``fused``:
    quantize gradients and master weights, and encode/decode states, of many tensors at once (module docstring;
    bit-identical to ``fused=False``, the per-tensor reference path)."""
    return LowPrecisionOptimizer(optimizer, policy, telemetry=telemetry, seed=seed, fused=fused)
