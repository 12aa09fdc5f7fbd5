"""Builds (once per machine, cached by torch) and loads the CPU block-sparse extension ``csrc/block_sparse_cpu.cpp``.

The extension registers ``torch.ops.vidattn_cpu.runs_forward``: the torch backend's inference loop (one fused CPU
flash call per dense rectangle, log-sum-exp merge) in C++, run on the intra-op threads without the GIL. Building
needs a C++ compiler and ninja (a dependency); it takes 15-60 s the first time, then loads from torch's extension
cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
When it cannot be built the torch backend runs the same loop in Python and says so once in the log.
``VIDATTN_CPU_EXTENSION=0`` turns it off (read on first use, once per process).
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import torch

__all__ = ["cpu_extension", "extension_error"]

logger = logging.getLogger("vidattn.kernels")

_SOURCE = Path(__file__).parent / "csrc" / "block_sparse_cpu.cpp"
_LOCK = threading.Lock()
_STATE: dict = {}
_FAKE_REGISTERED: list = []


def cpu_extension() -> bool:
    """True when ``torch.ops.vidattn_cpu.runs_forward`` is available (built or loaded now if needed)."""
    if "ok" in _STATE:
        return _STATE["ok"]
    with _LOCK:
        if "ok" in _STATE:
            return _STATE["ok"]
        if os.environ.get("VIDATTN_CPU_EXTENSION", "1") == "0":
            _STATE.update(ok=False, error="disabled by VIDATTN_CPU_EXTENSION=0")
            logger.info("vidattn: CPU extension %s; the torch backend loops in Python", _STATE["error"])
            return False
        try:
            _build()
            _STATE["ok"] = True
        except Exception as exc:  # any build or load failure: fall back, loudly
            _STATE.update(ok=False, error=f"{type(exc).__name__}: {exc}".strip()[:2000])
            logger.warning("vidattn: the CPU extension could not be built (%s); the torch backend loops in Python, "
                           "20-30 %% slower on sparse patterns (full error: "
                           "vidattn.kernels.cpu_ext.extension_error())", _STATE["error"].splitlines()[0])
        return _STATE["ok"]


def _runs_forward_fake(q, k, v, acc, lse, tasks, calls, scale, workers) -> None:
    """Shape-only version for tracing (``torch.compile``): the op only writes into ``acc`` and ``lse``."""


def extension_error() -> str | None:
    """Why the extension is unavailable (None when it loaded or was not tried yet)."""
    return _STATE.get("error")


def _build() -> None:
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # torch looks for ninja on PATH; the pip package puts it in its own folder
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    logger.info("vidattn: loading the CPU extension (built on first use: 15-60 s)")
    load(name="vidattn_block_sparse_cpu", sources=[str(_SOURCE)], extra_cflags=["-O3"], is_python_module=False,
         verbose=False)
    if not _FAKE_REGISTERED:  # once per process, however often the state is reset
        torch.library.register_fake("vidattn_cpu::runs_forward")(_runs_forward_fake)
        _FAKE_REGISTERED.append(True)
