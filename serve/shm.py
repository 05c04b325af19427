"""System (POSIX) shared memory regions, as Triton's shared-memory extension registers them.

A local client (`perf_analyzer --shared-memory system`, `tritonclient.utils.shared_memory`) creates
a POSIX shm object, registers it under a region name with a key (`/name`), offset and size, then
sends requests whose inputs name a region instead of carrying bytes, and asks for outputs to be
written into a region. The server maps the object with mmap (read/write, never created, never
unlinked: the client owns it). Inputs are copied out of the region once (a few KB per image; the
batcher concatenates anyway), outputs are written in place. The registry is shared by HTTP and gRPC.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.errors import InputError

SHM_ROOT = "/dev/shm"
_KEY = re.compile(r"^/?[A-Za-z0-9_.\-]{1,200}$")  # POSIX shm names: one component, no '/' inside


class SharedMemoryError(InputError):
    """A region that cannot be registered, is unknown, or is too small for a tensor (HTTP 400)."""


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    buffer: mmap.mmap

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class SharedMemoryRegistry:
    """Registered regions by name; thread-safe (requests decode in the pool, gRPC on the loop)."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: Any, byte_size: Any) -> None:  # checked here
        if not isinstance(name, str) or not name:
            raise SharedMemoryError("a shared memory region needs a name")
        if not isinstance(key, str) or not _KEY.match(key) or key.strip("/.") == "":
            raise SharedMemoryError(f"invalid shared memory key {key!r}: expected a POSIX name such as "
                                    "'/region'")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, byte_size)) \
                or offset < 0 or byte_size <= 0:
            raise SharedMemoryError(f"shared memory region '{name}': offset must be >= 0 and byte_size > 0")
        with self._lock:
            if name in self._regions:
                raise SharedMemoryError(f"shared memory region '{name}' already in manager")
            path = os.path.join(SHM_ROOT, key.lstrip("/"))
            try:
                fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
            except OSError as exc:
                raise SharedMemoryError(f"Unable to open shared memory region: '{key}' "
                                        f"({exc.strerror})") from None
            try:
                size = os.fstat(fd).st_size
                if offset + byte_size > size:
                    raise SharedMemoryError(f"shared memory region '{name}': offset {offset} + byte_size "
                                            f"{byte_size} is beyond the {size} bytes of '{key}'")
                buffer = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            self._regions[name] = Region(name, key, offset, byte_size, buffer)

    def unregister(self, name: str | None = None) -> None:
        """One region, or all of them (name None); unknown names are not an error (as Triton)."""
        with self._lock:
            names = list(self._regions) if name is None else [name]
            for each in names:
                region = self._regions.pop(each, None)
                if region is not None:
                    region.buffer.close()

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if name is None:
                return [r.status() for r in self._regions.values()]
            if name not in self._regions:
                raise SharedMemoryError(f"Unable to find system shared memory region: '{name}'")
            return [self._regions[name].status()]

    def _span(self, name: Any, offset: Any, byte_size: Any, what: str) -> tuple[Region, int]:
        if not isinstance(name, str) or name not in self._regions:
            raise SharedMemoryError(f"{what}: unknown shared memory region {name!r}; register it first")
        region = self._regions[name]
        offset = 0 if offset is None else offset
        if not isinstance(offset, int) or not isinstance(byte_size, int) or isinstance(byte_size, bool) \
                or offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise SharedMemoryError(f"{what}: offset {offset!r} + byte size {byte_size!r} is outside shared "
                                    f"memory region '{name}' of {region.byte_size} bytes")
        return region, region.offset + offset

    def read(self, name: Any, offset: Any, byte_size: Any, dtype: np.dtype, shape: list[int],
             what: str) -> np.ndarray:
        """A copy of the tensor `what` stored in the region (its byte size must match the shape)."""
        needed = math.prod(shape) * dtype.itemsize
        if byte_size != needed:
            raise SharedMemoryError(f"{what}: shared_memory_byte_size {byte_size!r} does not match shape "
                                    f"{shape} ({needed} bytes)")
        with self._lock:
            region, start = self._span(name, offset, byte_size, what)
            return np.frombuffer(region.buffer, dtype=dtype, count=needed // dtype.itemsize,
                                 offset=start).reshape(shape).copy()

    def check(self, name: Any, offset: Any, byte_size: Any, what: str) -> None:
        with self._lock:
            self._span(name, offset, byte_size, what)

    def write(self, name: Any, offset: Any, byte_size: Any, data: bytes, what: str) -> None:
        if len(data) > byte_size:
            raise SharedMemoryError(f"{what}: {len(data)} bytes do not fit shared_memory_byte_size "
                                    f"{byte_size}")
        with self._lock:
            region, start = self._span(name, offset, byte_size, what)
            region.buffer[start:start + len(data)] = data

    def close(self) -> None:
        self.unregister(None)
