"""Process memory settings of glibc, the C library of most Linux systems."""

from __future__ import annotations

import ctypes
import gc
import sys
from typing import Callable

# mallopt parameter number of M_MMAP_THRESHOLD in glibc's malloc.h.
_M_MMAP_THRESHOLD = -3


def _glibc_function(name: str) -> Callable[..., int] | None:
    """Return the glibc function ``name``, or None on other systems and C libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):  # a libc other than glibc, e.g. musl
        return None


def use_low_memory_allocator(threshold: int = 4 * 1024 * 1024) -> bool:
    """Make glibc map blocks of ``threshold`` bytes and more on their own, and unmap them when freed.

    By default glibc keeps freed activation memory in its heaps and fragments it, so resident
    memory stays far above the live tensors. Unmapped blocks leave no such reserve, but the
    kernel zeroes their pages again on every step. Returns False where this libc lacks mallopt.
    """
    mallopt = _glibc_function("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def release_memory() -> None:
    """Return the memory that a finished training run left behind to the operating system.

    Trainer objects form reference cycles, so they are freed only when the garbage collector
    runs. glibc then keeps the freed heap mapped (several GB after SmolLM2 training). That
    memory adds to the peak of an evaluation in the same process, so ``malloc_trim`` returns
    it.
    """
    gc.collect()
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)
