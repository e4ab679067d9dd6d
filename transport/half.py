"""float16 <-> float32 conversions and the float16 finiteness check, fast.

numpy converts float32 to float16 (and back) one element at a time in software: about
10 ns an element here, so the fp16 codec cost more CPU than encrypting the bytes it
saves. PyTorch's CPU kernels convert with vector instructions (F16C/AVX-512), ~100x
faster, and round the same way (IEEE round-to-nearest-even; checked by the tests). torch
is optional (the ``torch`` extra, not a base dependency): where it is installed it is
imported lazily, on the first large conversion, so tools that never touch fp16 do not pay
its import time; where it is missing, numpy does the work.

torch refuses read-only arrays (it warns, then may write through them): such inputs are
copied first, which is still far cheaper than numpy's conversion. Conversions go in
slices of torch's parallel grain size, so they run on the calling thread: a parallel
region would wake torch's OpenMP workers, which then spin for a while on CPUs that the
event loop, the channel pool and training need. The slices go in one call
(``torch._foreach_copy_``), so the GIL is released once per conversion, not per slice.

Decoders remember the float16 bytes each float32 tensor they decoded from float16 came
from (``remember_half``; ``half_source`` returns them while that tensor lives). A tensor
so decoded holds exactly ``half_to_float`` of them, so what needs its float16 form (an
update's signed digest, ``transport.e2e.update_digest``; the store's fp16 records) takes
them instead of converting and checking again. The decoder hands out the tensor
``remember_half`` returns: a view of read-only memory (a read-only ``memoryview``), which
numpy refuses to make writable, and whose ``base`` chain holds nothing writable either,
so it keeps equal to ``half_to_float`` of its source for its whole life. Once its float16
is no longer needed, ``forget_half`` drops it: the store does once it has written an
update's float16 (``federation.store``), the end-to-end check once it has verified a
model (whose digest covers its float32), so only updates not yet persisted carry it.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

F16 = np.dtype("<f2")
F32 = np.dtype("<f4")
_TORCH_ABOVE = 4096  # elements: below this numpy is as fast as the call into torch
_SLICE = 32768  # elements: at::internal::GRAIN_SIZE, below which torch stays single-threaded
_HALF_EXPONENT = 0x7C00


@functools.cache
def _torch() -> ModuleType | None:
    try:
        import torch
    except ImportError:  # torch is optional (the torch extra): numpy converts alone
        return None
    if _ONE_THREAD:
        torch.set_num_threads(1)
    return torch


_ONE_THREAD = False  # ``one_thread`` was called


def one_thread() -> None:
    """For a process that trains nothing (an aggregator daemon): torch, once imported for
    a conversion (now, if it already is), runs on one intra-op thread, so a conversion
    is one call on the calling thread, with no slices: each slice's view released the GIL
    as it was made and freed, hand-offs with the event loop that cost CPU. fedloom's torch
    workloads set one thread for their jobs anyway (``workloads.models``); a thread that
    used torch before this call keeps its count and its conversions go in slices."""
    global _ONE_THREAD
    _ONE_THREAD = True
    if "torch" in sys.modules:
        _torch.cache_clear()
        _torch()


def _writable(arr: npt.NDArray[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    arr = np.ascontiguousarray(arr, dtype=dtype)
    return arr if arr.flags.writeable else arr.copy()


def to_half(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``x.astype(float16)`` (overflow gives +-Inf, as numpy does), one-dimensional."""
    flat = x.reshape(-1)
    torch = _torch() if flat.size > _TORCH_ABOVE else None
    if torch is None:
        with np.errstate(over="ignore"):
            return flat.astype(F16)
    out = np.empty(flat.size, dtype=F16)
    _copy(torch, out, _writable(flat, F32))
    return out


def half_to_float(h: npt.NDArray[Any], out: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
    """``h`` as float32, one-dimensional, written into ``out`` when given.

    Finite values and infinities convert identically either way; a NaN's payload bits
    may not (numpy and torch may quiet a signalling NaN differently), and which one runs
    depends on the size converted, so a streamed decode (piece by piece) could then differ
    from a whole one in a NaN's bits. Harmless while ``Limits.reject_nonfinite`` is on (the
    default: a message carrying a NaN is refused); the signed digest covers the
    float16 on the wire either way."""
    flat = h.reshape(-1)
    if out is None:
        out = np.empty(flat.size, dtype=F32)
    torch = _torch() if flat.size > _TORCH_ABOVE else None
    if torch is None or not out.flags.writeable or not out.flags.c_contiguous:
        out[...] = flat
    else:
        _copy(torch, out, _writable(flat, F16))
    return out


def _copy(torch: Any, dst: npt.NDArray[Any], src: npt.NDArray[Any]) -> None:
    d, s = torch.from_numpy(dst), torch.from_numpy(src)
    if torch.get_num_threads() == 1:  # this thread's count: no parallel region to avoid
        d.copy_(s)
        return
    # The slices as views made in one call each (``split``), not one Python indexing
    # per slice: for a 4 MB tensor that indexing cost a third of the conversion.
    dsts, srcs = torch.split(d, _SLICE), torch.split(s, _SLICE)
    foreach = _foreach_copy(torch)
    if foreach is not None:
        # All slices in one call, which releases the GIL once: a call per slice handed
        # the GIL back and forth with the event loop 32 times per million elements, and
        # those hand-offs cost an aggregator about 1 ms of CPU per fp16 update.
        try:
            foreach(list(dsts), list(srcs))
            return
        except (RuntimeError, TypeError):  # a torch whose foreach refuses these: loop
            global _foreach_refused
            _foreach_refused = True
    for to, part in zip(dsts, srcs, strict=True):
        to.copy_(part)


_foreach_refused = False  # ``_foreach_copy_`` refused a copy: slice by slice from then on


def _foreach_copy(torch: Any) -> Any:
    """``torch._foreach_copy_`` (torch >= 2.1; what ``torch.optim`` uses to update many
    tensors in one call), or None: a private name, so the per-slice loop stays the
    fallback, for a torch without it or one whose foreach refused a copy."""
    return None if _foreach_refused else getattr(torch, "_foreach_copy_", None)


def half_all_finite(h: npt.NDArray[Any]) -> bool:
    """True when no element is NaN or +-Inf (all exponent bits set), from the bit pattern:
    ten times faster than ``np.isfinite`` on float16. The largest exponent field is all
    ones exactly when one is: one masked copy and one vectorised max (comparing each
    field, then ``any``, cost two more passes: 0.106 -> 0.073 ms per 1M elements)."""
    bits = np.ascontiguousarray(h, dtype=F16).reshape(-1).view(np.uint16)
    return bits.size == 0 or int(np.bitwise_and(bits, _HALF_EXPONENT).max()) != _HALF_EXPONENT


# id(float32 tensor) -> (a weak reference to it, the float16 it was decoded from)
_SOURCES: dict[int, tuple[weakref.ref[Any], npt.NDArray[Any]]] = {}


def frozen(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A view of contiguous ``arr``'s memory through a read-only ``memoryview``: numpy
    refuses to make it (or its base) writable, so nothing written through it or through
    an ordinary numpy path changes it (``arr`` itself is made read-only too)."""
    flat = arr.reshape(-1)
    flat.flags.writeable = False
    view = np.frombuffer(flat.data.toreadonly(), dtype=arr.dtype)
    return view.reshape(arr.shape)


def remember_half(decoded: npt.NDArray[Any], half: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Remember that float32 ``decoded`` is ``half_to_float(half)``, element for element
    (same shape, both C-contiguous), and return the tensor to hand out in its place: a
    ``frozen`` view of ``decoded``, remembered for as long as it lives. Neither may be
    changed through the caller's own references afterwards (both are made read-only
    here, and the returned view and ``half_source``'s answer cannot be made writable)."""
    if (
        decoded.dtype != F32
        or half.dtype != F16
        or decoded.shape != half.shape
        or not decoded.flags.c_contiguous
        or not half.flags.c_contiguous
    ):
        raise ValueError("remember_half: a float32 tensor and its float16 source, same shape")
    out = frozen(decoded)
    key = id(out)

    def forget(ref: weakref.ref[Any]) -> None:  # runs as ``out`` dies: before its id
        found = _SOURCES.get(key)  # can be reused
        if found is not None and found[0] is ref:
            del _SOURCES[key]

    _SOURCES[key] = (weakref.ref(out, forget), frozen(half))
    return out


def forget_half(arr: object) -> None:
    """Drop ``arr``'s float16 source (``remember_half``), if it has one: once an update
    has been checked and persisted nothing needs it, and it holds half the float32's
    bytes for as long as the tensor lives (in an update buffer, say)."""
    found = _SOURCES.get(id(arr))
    if found is not None and found[0]() is arr:
        del _SOURCES[id(arr)]


def forget_halves(tensors: Mapping[str, object]) -> None:
    """``forget_half`` for each of ``tensors``."""
    for value in tensors.values():
        forget_half(value)


def half_source(arr: object) -> npt.NDArray[Any] | None:
    """The float16 tensor ``arr`` was decoded from (``remember_half``; read-only, and
    numpy refuses to make it writable), or None: unknown, or forgotten."""
    found = _SOURCES.get(id(arr))
    if found is None or found[0]() is not arr:
        return None
    assert isinstance(arr, np.ndarray)
    return None if arr.flags.writeable else found[1]
