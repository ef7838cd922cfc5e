"""This process's resident memory and its high-water mark, for peak-memory measurements on CPU.

``ru_maxrss`` is not used: Linux carries a parent's high-water mark into a child across
fork/exec, so a child of a large benchmark process would report the parent's peak. ``VmHWM`` can
instead be reset to the current resident set (``/proc/self/clear_refs``, Linux >= 4.0) just
before the part being measured.
"""

from __future__ import annotations

import os


def rss_bytes() -> int:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_hwm() -> int | None:
    """Resident-set high-water mark (``VmHWM``); None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current resident set; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
