"""Builds (once per source, torch version and flags on a machine) and loads the CPU block-sparse extension
``csrc/block_sparse_cpu.cpp``.

The extension registers ``torch.ops.vidattn_cpu.runs_forward`` (and its ``runs_backward``, for training): the torch
backend's inference loop (one fused CPU
flash call per dense rectangle, log-sum-exp merge; partial blocks of a window predicate masked from per-token
bound tables) in C++, run on the intra-op threads without the GIL. Building
needs a C++ compiler and ninja (a dependency); it takes 15-60 s the first time, then loads from the extensions folder
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions/<python>_<accelerator>``).

The build is keyed: its name is ``vidattn_block_sparse_cpu_<key>`` where ``key`` is the first 12 hex digits of the
SHA-1 of the source, the torch version (and git revision), the compiler flags, ``$CXX``, the Python tag and the
machine (:func:`extension_name`). Every checkout and virtual environment with the same source and torch therefore
shares one build, and a different torch gets its own instead of rebuilding the shared one. The build runs under a
file lock (``<name>/build.lock``, ``fcntl.flock``: released by the OS if the builder dies) in a private temporary
folder, and the finished library is moved into ``<name>/<name>.so`` in one rename, so no process ever loads a
half-written library. A process that finds the library there loads it without taking the lock.

Call :func:`ensure_built` before timing attention: the first call builds or loads (logged once, ``vidattn: building
the CPU kernel, once per torch version``), later calls only read a flag.
When it cannot be built the torch backend runs the same loop in Python and says so once in the log.
``VIDATTN_CPU_EXTENSION=0`` turns it off (read on first use, once per process).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

__all__ = ["cpu_extension", "ensure_built", "extension_error", "extension_name", "build_or_load", "BUILD_MESSAGE"]

logger = logging.getLogger("vidattn.kernels")

_SOURCE = Path(__file__).parent / "csrc" / "block_sparse_cpu.cpp"
_PREFIX = "vidattn_block_sparse_cpu"
_FLAGS: tuple[str, ...] = ("-O3",)
_LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"
BUILD_MESSAGE = "vidattn: building the CPU kernel, once per torch version (15-60 s): %s"
_LOCK = threading.Lock()
_STATE: dict = {}
_FAKE_REGISTERED: list = []
_BUILD_LOGGED: set = set()  # extension names whose build this process has announced


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
        start = time.perf_counter()
        try:
            _build()
            _STATE["ok"] = True
        except Exception as exc:  # any build or load failure: fall back, loudly
            _STATE.update(ok=False, error=f"{type(exc).__name__}: {exc}".strip()[:2000])
            logger.warning("vidattn: the CPU extension could not be built (%s); the torch backend loops in Python, "
                           "20-30 %% slower on sparse patterns (full error: "
                           "vidattn.kernels.cpu_ext.extension_error())", _STATE["error"].splitlines()[0])
        _STATE["seconds"] = time.perf_counter() - start
        return _STATE["ok"]


def ensure_built() -> bool:
    """Build or load the extension now (the first call per process; later calls read a flag) so that the build is
    not counted as attention time: call it before starting a timer around CPU attention. Same result as
    :func:`cpu_extension`."""
    return cpu_extension()


def _runs_forward_fake(q, k, v, acc, lse, tasks, calls, scale, workers, q_bounds=None, k_coords=None) -> None:
    """Shape-only version for tracing (``torch.compile``): the op only writes into ``acc`` and ``lse``."""


def _runs_backward_fake(grad_out, q, k, v, out, lse, dq, dk, dv, tasks, calls, scale, workers, q_bounds=None,
                        k_coords=None) -> None:
    """Shape-only version for tracing: the op only adds into ``dq``, ``dk`` and ``dv``."""


def extension_error() -> str | None:
    """Why the extension is unavailable (None when it loaded or was not tried yet)."""
    return _STATE.get("error")


def extension_name(source: Optional[bytes] = None, *, torch_version: Optional[str] = None,
                   flags: Sequence[str] = _FLAGS, prefix: str = _PREFIX) -> str:
    """The build's name: ``prefix`` and 12 hex digits of the SHA-1 of everything the library depends on (the source
    text, the torch version and git revision, the flags, ``$CXX``, the Python tag and the machine). ``source``
    defaults to ``csrc/block_sparse_cpu.cpp``, ``torch_version`` to the running torch's."""
    if source is None:
        source = _SOURCE.read_bytes()
    if torch_version is None:
        torch_version = f"{torch.__version__} {getattr(torch.version, 'git_version', '')}"
    digest = hashlib.sha1()
    for part in (source, torch_version, "\x1f".join(flags), os.environ.get("CXX", ""),
                 sys.implementation.cache_tag or "", platform.machine()):
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\x00")
    return f"{prefix}_{digest.hexdigest()[:12]}"


def build_or_load(source: Path = _SOURCE, *, flags: Sequence[str] = _FLAGS, prefix: str = _PREFIX) -> Path:
    """Load the library built from ``source`` into this process (``torch.ops.load_library``), building it first
    under the folder's lock if no process on this machine has yet; returns the library's path."""
    source = Path(source)
    text = source.read_bytes()
    name = extension_name(text, flags=flags, prefix=prefix)
    home = _build_home(name)
    lib = home / f"{name}{_LIB_EXT}"
    loaded = False
    if not lib.exists():
        with _file_lock(home / "build.lock", on_wait=lambda: _announce(name, "waiting for another process")):
            if not lib.exists():  # another process may have finished while we waited
                loaded = _compile(name, text, source.name, flags, home, lib)
    if not loaded:
        torch.ops.load_library(str(lib))
    return lib


def _build() -> None:
    build_or_load(_SOURCE)
    if not _FAKE_REGISTERED:  # once per process, however often the state is reset
        torch.library.register_fake("vidattn_cpu::runs_forward")(_runs_forward_fake)
        torch.library.register_fake("vidattn_cpu::runs_backward")(_runs_backward_fake)
        _FAKE_REGISTERED.append(True)


def _build_home(name: str) -> Path:
    """``<extensions root>/<name>``, created: the root is torch's (``TORCH_EXTENSIONS_DIR`` or its default)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, False))
    except (ImportError, TypeError):  # private helper gone or changed: same rule, no accelerator sub-folder
        from torch.utils.cpp_extension import get_default_build_root

        home = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
        home.mkdir(parents=True, exist_ok=True)
        return home


def _announce(name: str, what: str) -> None:
    if name not in _BUILD_LOGGED:
        _BUILD_LOGGED.add(name)
        logger.info(BUILD_MESSAGE, f"{what} ({name})")


@contextmanager
def _file_lock(path: Path, on_wait=None) -> Iterator[None]:
    """An exclusive lock on ``path`` between processes; ``on_wait()`` runs when another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: filelock (a torch dependency)
        from filelock import FileLock, Timeout

        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _compile(name: str, text: bytes, filename: str, flags: Sequence[str], home: Path, lib: Path) -> bool:
    """Build in a fresh folder under ``home`` (caller holds the lock), load it, move the library to ``lib``
    atomically; True (loaded)."""
    from torch.utils.cpp_extension import load

    _announce(name, "compiling")
    if shutil.which("ninja") is None:  # torch looks for ninja on PATH; the pip package puts it in its own folder
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    for stale in home.glob("tmp-*"):  # left by a builder that died; we hold the lock, so nobody uses them
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="tmp-", dir=home))
    try:
        src = work / filename
        src.write_bytes(text)
        built = load(name=name, sources=[str(src)], extra_cflags=list(flags), build_directory=str(work),
                     is_python_module=False, verbose=False)
        try:
            os.replace(built, lib)  # same file: what this process loaded from ``work`` is what others load
        except OSError:  # e.g. Windows, where a loaded library cannot be renamed
            part = lib.with_name(lib.name + f".{os.getpid()}.part")
            shutil.copy2(built, part)
            os.replace(part, lib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return True
