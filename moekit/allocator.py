"""Keep freed tensor memory from lingering in the process.

glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which tensor-sized blocks come
from the heap and fragment it: a streaming merge then looks like it holds hundreds of MB it no longer uses. Pinning
the threshold makes blocks above it their own mappings, returned to the OS when freed, while the many same-sized
blocks below it (row chunks of 1M elements, layer weights) are reused from the heap without fresh page faults.
Measured on a 3 x 300 MB bf16 linear merge (4M-element chunks): peak RSS 526 MB -> 390 MB; a 1 MB threshold cost
~3 s more CPU in page faults, 8 MB with 1M-element chunks costs nothing measurable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3


def return_freed_memory_promptly(threshold: int = 8 << 20) -> bool:
    """Pin glibc's mmap threshold; a no-op (False) on other C libraries."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
