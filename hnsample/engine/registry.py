"""Which backend serves which device type.

A backend (``hnsample.engine.backends``) bundles a device type's compiled kernels and its selection
driver. The registered ops look their backend up here when they run, so a test can swap one in (the CPU
emulator of the CUDA kernels, say) with :func:`use` instead of patching module internals.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

_backends: dict[str, Any] = {}
_lock = threading.Lock()


def register(device_type: str, backend: Any) -> None:
    """Makes `backend` the one for `device_type` ("cpu", "cuda")."""
    with _lock:
        _backends[device_type] = backend


def get(device_type: str) -> Any:
    """The backend of a device type."""
    try:
        return _backends[device_type]
    except KeyError:
        raise ValueError(f"hnsample has no backend for {device_type!r} tensors (it runs on cpu and cuda)") from None


@contextlib.contextmanager
def use(device_type: str, backend: Any) -> Iterator[Any]:
    """`backend` serves `device_type` for the duration of the block (process-wide)."""
    with _lock:
        previous = _backends.get(device_type)
        _backends[device_type] = backend
    try:
        yield backend
    finally:
        with _lock:
            if previous is None:
                _backends.pop(device_type, None)
            else:
                _backends[device_type] = previous
