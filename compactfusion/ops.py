"""The compressed exchanges as ``torch.library`` custom ops, opaque to ``torch.compile``.

``torch.ops.compactfusion.all_gather(x, handle, site, group)`` and
``torch.ops.compactfusion.all_to_all(x, handle, site, group)`` run
:func:`~compactfusion.collectives.compressed_all_gather` /
:func:`~compactfusion.collectives.compressed_all_to_all` (encode, collective, decode, base
update) as one call that dynamo records without tracing into it. Their fake implementations
give the output's shape from the input's alone (``(world, *x.shape)`` and ``x.shape``), so a
compiled model sees fixed sizes and no data-dependent control flow; inductor cannot fuse
neighbouring operations into them or change the rounding the codecs rely on for sender and
receiver bases to agree bit for bit, because the op bodies run eagerly.

Only strings cross the op boundary besides ``x``:

* ``handle`` names a :class:`~compactfusion.residual.ResidualCompressor` registered with
  :func:`register` (a weak, process-wide index: it keeps nothing alive, the way
  ``torch.distributed`` resolves process groups by name; the compressor itself lives in its
  pipeline's state);
* ``site`` is the exchange's site name (a constant in the compiled graph: e.g. the layer
  name, resolved outside the op);
* ``group`` is the process group's name (:func:`~compactfusion.collectives.group_name`).
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.distributed as dist

from .collectives import compressed_all_gather, compressed_all_to_all, group_name
from .residual import ResidualCompressor

_COMPRESSORS: weakref.WeakValueDictionary[str, ResidualCompressor] = weakref.WeakValueDictionary()
_NEXT = itertools.count()


def register(comp: ResidualCompressor) -> str:
    """A handle under which the custom ops find ``comp`` (held weakly)."""
    if not isinstance(comp, ResidualCompressor):
        raise TypeError(f"expected a ResidualCompressor, got {type(comp).__name__}")
    handle = f"compressor{next(_NEXT)}"
    _COMPRESSORS[handle] = comp
    return handle


def _compressor(handle: str) -> ResidualCompressor:
    comp = _COMPRESSORS.get(handle)
    if comp is None:
        raise RuntimeError(
            f"compactfusion: no live compressor is registered as {handle!r} (its pipeline was "
            "unpatched or garbage-collected); re-run the compiled model after patching again"
        )
    return comp


def _group(name: str) -> dist.ProcessGroup:
    # The resolver functional collectives use (torch keeps no public name -> group lookup).
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


# Defined with ``torch.library.Library`` rather than ``torch.library.custom_op``: the ops are
# inference-only, and the lower-level registration skips custom_op's Python autograd and
# aliasing wrappers on every call (about 20 us per call less on the development CPU). The
# kernels are registered for every backend at once (CompositeExplicitAutograd); outputs carry
# no gradient.
_LIB = torch.library.Library("compactfusion", "DEF")
_LIB.define("all_gather(Tensor x, str handle, str site, str group) -> Tensor")
_LIB.define("all_to_all(Tensor x, str handle, str site, str group) -> Tensor")


def _all_gather_impl(x, handle, site, group):
    return compressed_all_gather(_compressor(handle), site, x, _group(group))


def _all_to_all_impl(x, handle, site, group):
    return compressed_all_to_all(_compressor(handle), site, x, _group(group))


def _all_gather_fake(x, handle, site, group):
    return x.new_empty((dist.get_world_size(_group(group)), *x.shape))


def _all_to_all_fake(x, handle, site, group):
    return torch.empty_like(x)


_LIB.impl("all_gather", _all_gather_impl, "CompositeExplicitAutograd")
_LIB.impl("all_to_all", _all_to_all_impl, "CompositeExplicitAutograd")
torch.library.register_fake("compactfusion::all_gather", _all_gather_fake, lib=_LIB)
torch.library.register_fake("compactfusion::all_to_all", _all_to_all_fake, lib=_LIB)


def all_gather(x: torch.Tensor, handle: str, site: str, group: str) -> torch.Tensor:
    """Compressed all-gather of ``x``: ``(world, *x.shape)``, this rank's slot exact
    (``torch.ops.compactfusion.all_gather``)."""
    return torch.ops.compactfusion.all_gather(x, handle, site, group)


def all_to_all(x: torch.Tensor, handle: str, site: str, group: str) -> torch.Tensor:
    """Compressed all-to-all of ``x`` (equal splits along dim 0), shaped like ``x``
    (``torch.ops.compactfusion.all_to_all``)."""
    return torch.ops.compactfusion.all_to_all(x, handle, site, group)


__all__ = ["all_gather", "all_to_all", "group_name", "register"]
