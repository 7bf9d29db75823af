"""lowprec: emulated low-precision number formats and where they apply."""

# the numerics core, bottom up: formats -> spec -> rounding / scaling -> quantize (the one path) -> codecs, delayed
from .formats import ALIASES, FORMATS, Format, float_format, format_table, get_format, int_format
from .spec import SCALED_FORMATS, QuantSpec, Rounding, Scaling, spec
from .rounding import compiled_quantizer, round_to_format
from .quantize import quantize, quantize_with_scale
from .delayed import DelayedScaler
from .codecs import Encoded, NonFiniteError, decode, encode

__all__ = ["ALIASES", "FORMATS", "Format", "float_format", "format_table", "get_format", "int_format",
           "SCALED_FORMATS", "QuantSpec", "Rounding", "Scaling", "quantize", "quantize_with_scale",
           "round_to_format", "spec", "compiled_quantizer", "DelayedScaler", "Encoded", "encode", "decode",
           "NonFiniteError"]

# lowprec in training (helper "training"): precision policies, quantized layers and optimizers, telemetry
from lowprec.policy import PRESETS, PrecisionPolicy
from lowprec.telemetry import Telemetry
from lowprec import accumulate, hardware, nn, optim, telemetry

__all__ += ["PrecisionPolicy", "PRESETS", "Telemetry", "accumulate", "hardware", "nn", "optim", "telemetry"]

from lowprec.adamw import NativeAdamW

__all__ += ["NativeAdamW"]
