"""stosign: sign-based optimizers (StoSignSGD, SignSGD/Signum, Lion), sign conversion, 1-bit DDP.

Independent of lowprec. See stosign.optim for the algorithm, stosign.convert for turning any optimizer into its
(stochastic) sign counterpart and stosign.distributed for 1-bit gradient communication.
"""
from .sign import NOISE_SCALE, random_int16, stochastic_sign
from .optim import ABLATIONS, BUFFERS, SignSGD, StoSignSGD
from .lion import Lion
from .convert import SignConverted
from . import distributed

__all__ = ["distributed", "stochastic_sign", "random_int16", "NOISE_SCALE", "StoSignSGD", "SignSGD", "Lion", "SignConverted", "BUFFERS", "ABLATIONS"]
