"""glibc's malloc set up for a training process: freed tensor memory stays for the next step.

On the CPU, torch takes every tensor's memory from the C allocator and frees it when the
tensor dies. glibc serves large requests with fresh ``mmap`` pages and, by default, gives
freed memory at the top of the heap back to the OS once it exceeds a trim threshold; a
training step frees its activations at the end, so the next step asks the kernel for the same
memory again, and every page of it is faulted in and zeroed anew. Fixing the mmap threshold at
its largest value (32 MiB on 64-bit: larger blocks still get their own mapping) and trimming
only past 2 GiB of free memory keeps that memory in the process. Peak RSS is unchanged (the
high-water mark); RSS only does not fall between steps. ``training.keep_freed_memory``
switches it on (the default); its effect is measured by ``benchmarks/speedups.py``
(docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import functools
import sys

# mallopt(3) parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's cap on M_MMAP_THRESHOLD on 64-bit: 4 MiB * sizeof(long).
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
# mallopt's value is a C int: the largest trim threshold is INT_MAX.
TRIM_THRESHOLD_MAX = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory in the process (once per process); returns
    whether it did, False where the C library is not glibc (macOS, musl, Windows)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX) == 1
    return mmap_set and trim_set


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    return libc
