"""Quantized layers: every GEMM operand quantized per a PrecisionPolicy, forward and backward.

``convert(model, policy)`` (``lowprec.nn.converter``) swaps, in place, ``nn.Linear`` (and subclasses keeping its
forward), Hugging Face ``Conv1D``, ``nn.Conv1d/2d/3d``, ``nn.Embedding`` and ``nn.MultiheadAttention`` for their
quantized twins; ``coverage(model)`` reports what is quantized and what is not, and why (``coverage(model, x)``
also lists the functional matmuls one forward pass runs in full precision, ``lowprec.nn.trace``). Every weight layer runs
three labelled GEMMs through one autograd function (``lowprec.nn.function``):

    forward      y  = Q_act(x)        @ Q_w(W)^T     reduction over in_features
    grad-input   dx = Q_grad(dy)      @ Q_w(W)       reduction over out_features
    grad-weight  dW = Q_grad(dy)^T    @ Q_act(x)     reduction over the batch/token rows

Block scaling runs along each GEMM's own reduction axis (so W, x and dy are quantized twice, once per GEMM,
when the spec is block-scaled; square 2-D blocks such as ``nvfp4:block16x16`` are the same tiles along either axis,
so the backward reuses the forward's weight); ``policy.wgrad_rht`` applies NVFP4's random Hadamard transform to
the grad-weight GEMM's operands (``lowprec.nn.function``); channel scaling puts one scale per row of the left operand / column of the right
one; tensor scaling is shared. The bias is added in fp32 and its gradient is the fp32 sum of the unquantized
grad_output (as Transformer Engine does). Embedding tables are quantized per ``policy.weight`` along the
embedding dimension with a straight-through gradient. Convolutions are the same three GEMMs of the implicit
im2col (``lowprec.nn.conv``). Attention's own matmuls (QK^T, attention x V) are quantized only on request
(``convert(..., attention=True)``; ``lowprec.nn.attention``). Normalisations, pooling and element-wise ops stay
in full precision.

Backends (``lowprec.gemm``): ``"emulated"`` quantizes then multiplies in fp32 (or through
``lowprec.accumulate.matmul`` when the policy has an accumulator); ``"native"`` runs ``torch._scaled_mm`` on
float8 operands quantized by lowprec (so every rounding mode works); ``"auto"`` picks native per GEMM where
possible on a CUDA device, and emulated on the CPU (whose ``_scaled_mm`` is a software path, on some CPUs hundreds
of times slower: ``lowprec.gemm``). Native and emulated multiply the same values and both accumulate in fp32: they
differ by summation order only.

Delayed scaling (``e4m3:delayed16``; Transformer Engine's DelayedScaling): every site (layer x role) whose spec is
delayed owns a ``lowprec.DelayedScaler`` (``layer.site.scalers[role]``); each call quantizes with the scale from the
history of the previous calls, then appends its own amax (training mode only: ``model.eval()`` freezes them). An
operand quantized twice in one step reuses that step's scale and records once. Histories are saved in the
module's ``state_dict`` (keys ``<module>.lowprec_delayed.<role>.{amax_history,scale,scale_inv,steps}``, attention
sites ``...lowprec_delayed.qk.<role>...``; only for delayed specs, so other models keep their keys) and restored
by ``load_state_dict`` (a checkpoint without them leaves the histories as they are); re-``convert``/``configure``
resets them. Under DDP, ``reduce_amax(model)`` all-reduces (max) every recorded amax across ranks. Outside
layers a delayed spec has no history and scales by the current amax (see ``lowprec.Scaling``).

Stochastic rounding in layers draws from torch's global RNG; operands whose spec is block/channel-scaled or
stochastic are re-quantized from the saved full-precision tensor in the backward (as microxcaling does),
tensor-scaled deterministic ones reuse the forward's quantized tensor.

Under the ``fp32`` policy (or any policy leaving weight, activation, grad and accumulator unset) the layers call
the original arithmetic (``F.linear``, ``F.conv2d``, ``F.embedding``, ...): bit-for-bit the unconverted model.
Parameters are the same objects (an optimizer built before ``convert`` keeps working) and ``state_dict`` keys
are unchanged (but for the delayed-scaling histories above). Empty inputs (an empty batch, an expert with no tokens) give empty outputs and zero gradients.
"""
from lowprec.gemm import BACKENDS, native_dtype
from lowprec.nn.attention import AttentionSite, QuantMultiheadAttention
from lowprec.nn.conv import QuantConv1d, QuantConv2d, QuantConv3d
from lowprec.nn.converter import Coverage, CoverageRow, convert, coverage, reduce_amax, register
from lowprec.nn.embedding import QuantEmbedding
from lowprec.nn.linear import QuantHFConv1D, QuantLinear
from lowprec.nn.site import WORLD, QuantModule, Site
from lowprec.nn.trace import functional_gemms

__all__ = ["convert", "coverage", "register", "reduce_amax", "Coverage", "CoverageRow", "QuantLinear",
           "QuantHFConv1D", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantEmbedding", "QuantMultiheadAttention",
           "AttentionSite", "QuantModule", "Site", "BACKENDS", "native_dtype", "functional_gemms",
           "WORLD"]
