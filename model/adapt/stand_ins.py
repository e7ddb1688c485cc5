"""Layer-construction stand-ins: Megatron-Core refuses to build two modules without CUDA-only packages, although
Foldtron's CPU/local layers provide the compute. Each is a context around one constructor, never process-wide.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def mamba_mixer_without_mamba_ssm(gated_norm: type) -> Iterator[None]:
    """MambaMixer.__init__ refuses to build without mamba-ssm (ssm/mamba_mixer.py:202, HAVE_MAMBA_SSM) and takes its
    gated norm from it (mamba_mixer.py:417, ExtendedRMSNorm over a MagicMock without mamba-ssm). During the
    constructor only, declare the kernels present and hand it `gated_norm`; the subclass's forward never reaches
    mamba-ssm. Keyed: only when mamba-ssm does not import."""
    from megatron.core.ssm import mamba_mixer as mm

    from . import enabled

    if mm.HAVE_MAMBA_SSM or not enabled("stand_in.mamba_mixer_without_mamba_ssm"):
        yield
        return
    saved = mm.HAVE_MAMBA_SSM, mm.ExtendedRMSNorm
    mm.HAVE_MAMBA_SSM, mm.ExtendedRMSNorm = True, gated_norm
    try:
        yield
    finally:
        mm.HAVE_MAMBA_SSM, mm.ExtendedRMSNorm = saved


@contextlib.contextmanager
def latent_moe_without_te(linear: type) -> Iterator[None]:
    """MoELayer.__init__ asserts TE for the LatentMoE projections (transformer/moe/moe_layer.py:266) and builds them
    as TELinear(parallel_mode="duplicated"); without TE, build them as `linear` with the same arguments and names."""
    from megatron.core.transformer.moe import moe_layer as ml

    from . import enabled

    if ml.HAVE_TE or not enabled("stand_in.latent_moe_without_te"):
        yield
        return
    saved = ml.HAVE_TE, ml.TELinear
    ml.HAVE_TE, ml.TELinear = True, linear
    try:
        yield
    finally:
        ml.HAVE_TE, ml.TELinear = saved
