"""Process-wide memory settings for the training loop: glibc's malloc keeps freed tensor
memory for reuse instead of handing it back to the kernel after every batch."""

from __future__ import annotations

import ctypes
import os

__all__ = ["keep_freed_memory"]

# glibc's malloc hands freed blocks above its mmap threshold (and free heap above its trim
# threshold) back to the kernel, so each batch's fp32 activations (0.4-0.8 MB apiece for
# the lecture CNN at batch 50) came back as fresh zeroed pages: ~83,000 page faults and
# ~8 % of an fp32 epoch here (benchmarks/bench_train.py). Keeping freed memory for reuse
# is what jemalloc and tcmalloc do.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's malloc.h
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum on 64-bit: larger blocks are mmapped
_TRIM_THRESHOLD_BYTES = 1 << 30  # free heap kept before any is returned to the kernel


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed tensor memory instead of unmapping it (process-wide,
    idempotent). True when applied; False without glibc (macOS, musl), where it is moot."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL("libc.so.6")
    except (ValueError, OSError):  # no such confstr name, or no glibc to load
        return False
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )
