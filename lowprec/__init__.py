"""lowprec: emulated low-precision number formats and where they apply."""

from .formats import ALIASES, FORMATS, Format, float_format, format_table, get_format, int_format
from .quantize import (SCALED_FORMATS, QuantSpec, Rounding, Scaling, compiled_quantizer, quantize,
                       quantize_with_scale, round_to_format, spec)
from .delayed import DelayedScaler
from .codecs import Encoded, decode, encode

__all__ = ["ALIASES", "FORMATS", "Format", "float_format", "format_table", "get_format", "int_format",
           "SCALED_FORMATS", "QuantSpec", "Rounding", "Scaling", "quantize", "quantize_with_scale",
           "round_to_format", "spec", "compiled_quantizer", "DelayedScaler", "Encoded", "encode", "decode"]

# lowprec in training (helper "training"): precision policies, quantized layers and optimizers, telemetry
from lowprec.policy import PRESETS, PrecisionPolicy
from lowprec.telemetry import Telemetry
from lowprec import accumulate, hardware, nn, optim, telemetry

__all__ += ["PrecisionPolicy", "PRESETS", "Telemetry", "accumulate", "hardware", "nn", "optim", "telemetry"]
