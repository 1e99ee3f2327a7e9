"""The ILT kinds by name: ``--ilt_kind`` picks one. A new kind is one file (a subclass of ``ilt.ILT``) and one
line here. Every name is imported by name, not discovered: an exported folder's remote code is copied by
following its relative imports.
"""

from __future__ import annotations

from .ilt import ILT
from .ilt_dense import DenseILT
from .ilt_depth import DepthILT
from .ilt_design import DesignILT
from .ilt_x0 import X0ILT
from .kernels import Paths

KINDS: dict[str, type[ILT]] = {cls.kind: cls for cls in (DesignILT, DepthILT, DenseILT, X0ILT)}


def ilt_class(kind: str, paths: Paths | None = None) -> type[ILT]:
    """The class of ``kind``, or the one ``paths`` puts in its place (a decoding copy's)."""
    if kind not in KINDS:
        raise ValueError(f"ModelConfig.ilt_kind must be one of {', '.join(KINDS)}; got {kind!r}")
    return (paths.ilts.get(kind) if paths is not None else None) or KINDS[kind]
