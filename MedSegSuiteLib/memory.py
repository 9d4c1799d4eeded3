"""Checking that a job fits in memory before it allocates, so a huge image fails fast with a reason."""

from __future__ import annotations

import os
from typing import Optional

from .errors import OutOfMemory

__all__ = ["available_bytes", "check_fits", "format_bytes"]

# Leave room for the interpreter, the viewer and everything else running.
_HEADROOM = 0.85


def available_bytes() -> Optional[int]:
    """Memory the system can give this process now (bytes), or None where it cannot be told.

    The least of the system's available memory, the room left under this process's
    address-space limit (``ulimit -v``) and the room left in its cgroup (containers, jobs).
    """
    limits = [value for value in (_system_available(), _rlimit_room(), _cgroup_room()) if value is not None]
    return min(limits) if limits else None


def _rlimit_room() -> Optional[int]:
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        import psutil

        return max(int(limit) - int(psutil.Process().memory_info().vms), 0)
    except (ImportError, OSError, ValueError):
        return None


def _cgroup_room() -> Optional[int]:
    root = "/sys/fs/cgroup"
    try:
        with open(f"{root}/memory.max", encoding="ascii") as handle:
            limit = handle.read().strip()
        if limit == "max":
            return None
        with open(f"{root}/memory.current", encoding="ascii") as handle:
            current = int(handle.read().strip())
        return max(int(limit) - current, 0)
    except (OSError, ValueError):
        return None


def _system_available() -> Optional[int]:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(count: float) -> str:
    """``1.5 GB``-style text for a byte count."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} bytes"


def check_fits(needed: float, what: str, advice: str) -> None:
    """Raise :class:`OutOfMemory` when ``needed`` bytes exceed what is free (less a safety margin)."""
    free = available_bytes()
    if free is not None and needed > free * _HEADROOM:
        raise OutOfMemory(
            f"{what} needs about {format_bytes(needed)} of memory but only {format_bytes(free)} is free; {advice}"
        )
