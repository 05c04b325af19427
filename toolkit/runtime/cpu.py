"""CPU facts the runtimes and pools size themselves by (psutil-free): the one place cores are counted.

`usable_cores` is what a pool of Python threads or processes should use (decode threads, serving
processes); `physical_cores` is what a compute library's intra-op pool should use (ONNX Runtime's
advice: one thread per physical core, SMT siblings share one core's arithmetic units).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


def usable_cores() -> int:
    """Logical CPUs this process may run on: its affinity mask (taskset, cgroup cpusets), else os.cpu_count().

    Not cached: a process's affinity may be narrowed after start-up (a serving worker pinned to its cores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may run on: SMT siblings count once (ORT's advice for intra-op threads)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores: set[str] = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))
