"""The native CPU kernels: C sources in ``csrc/`` built on first use with the system C compiler.

On CPU, MicroAdam's and EFCP's steps as chains of PyTorch ops are a few dozen passes over
memory; the C loops in ``csrc/microadam_cpu.c`` do each top-k block in one pass through a
block-sized scratch
(torch.compile's inductor was measured slower than the eager twins here: BENCHMARKS.md). They
are an accelerator, not a requirement: without a compiler, or when the build or the load fails,
:func:`library` returns None, :func:`unavailable` says why, and the dispatcher runs the PyTorch
twins, whose bits the C loops reproduce.

The library is built once per source and compiler into a cache directory (``HCO_NATIVE_CACHE``,
else ``$XDG_CACHE_HOME/hf_compressed_optim``, else ``~/.cache/hf_compressed_optim``), written
under a temporary name and renamed, so concurrent processes (data-parallel ranks) never load a
half-written file. Built with ``-march=native`` where the compiler takes it (the cache key
includes the CPU's model and flags, so a cache shared by different machines keeps one build
per CPU), ``-ffp-contract=off`` (no implicit fused multiply-adds: every fp32 operation rounds as
the twins'), and OpenMP where the compiler has it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("csrc") / "microadam_cpu.c"
CACHE_ENV = "HCO_NATIVE_CACHE"
_FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno")
_BUILD_TIMEOUT_S = 120

_I64, _INT, _F32, _U32, _PTR = (ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_uint32,
                                ctypes.c_void_p)
_SIGNATURES = {
    "hco_ef_compress": [_PTR, _INT, _PTR, _PTR, _PTR, _INT, _I64, _I64, _I64, _I64, _I64, _I64,
                        _PTR, _PTR, _INT, _INT, _INT],
    "hco_window_adam": [_PTR, _INT, _PTR, _PTR, _INT, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64,
                        _I64, _I64, _F32, _F32, _F32, _F32, _F32, _INT, _U32, _INT],
    "hco_sparse_dot": [_PTR, _PTR, _INT, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64,
                       _PTR, _INT],
    "hco_sparse_combine": [_PTR, _PTR, _INT, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64,
                           _I64, _INT, _INT],
}

_state: dict = {}  # "lib": the loaded library or None, "why": the reason it is None


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_compressed_optim"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc.split()[0]):
        return cc
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _version(cc: str) -> bytes:
    try:
        return subprocess.run([*cc.split(), "--version"], capture_output=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return b""


def _build(cc: str, target: Path) -> str | None:
    """Compile SOURCE into ``target`` (with OpenMP if possible); None, or why it failed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    err = ""
    for extra in (("-march=native", "-fopenmp"), ("-fopenmp",), ()):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            run = subprocess.run([*cc.split(), *_FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"],
                                 capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
            if run.returncode == 0:
                os.replace(tmp, target)
                return None
            err = run.stderr.strip()[-400:]
        except (OSError, subprocess.SubprocessError) as e:
            err = f"{type(e).__name__}: {e}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return f"{cc} failed: {err}"


def _cpu_identity() -> bytes:
    """What a ``-march=native`` build depends on: the machine, and on Linux the CPU's model and
    feature flags."""
    ident = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            ident += "".join(sorted({ln for ln in f if ln.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return ident.encode()


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if not SOURCE.exists():
        return None, f"source missing: {SOURCE}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install cc/gcc/clang)"
    key = hashlib.sha256(SOURCE.read_bytes() + repr(_FLAGS).encode() + cc.encode()
                         + _version(cc) + _cpu_identity()).hexdigest()[:16]
    target = _cache_dir() / f"{SOURCE.stem}-{key}.so"
    try:
        if not target.exists():
            why = _build(cc, target)
            if why is not None:
                return None, why
        lib = ctypes.CDLL(str(target))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
    except (OSError, AttributeError) as e:
        return None, f"{type(e).__name__}: {e}"
    return lib, None


def library() -> ctypes.CDLL | None:
    """The loaded native library (built on the first call), or None where it cannot be had."""
    if "lib" not in _state:
        _state["lib"], _state["why"] = _load()
    return _state["lib"]


def takes(*tensors) -> bool:
    """Whether the native loops can run on ``tensors``: the library is loaded and every tensor
    is a contiguous CPU tensor (the loops read raw pointers). Each op adds its dtype checks."""
    return library() is not None and all(t.device.type == "cpu" and t.is_contiguous()
                                         for t in tensors)


def call(name: str, *args) -> None:
    """Run the loop ``name`` of the loaded library (:func:`takes` said yes). The loops return
    non-zero only when their per-thread scratch cannot be allocated: a :class:`MemoryError`."""
    if getattr(library(), name)(*args) != 0:
        raise MemoryError(f"native {name}: no memory for its per-thread scratch")


def unavailable() -> str | None:
    """None when :func:`library` works, else why it does not (builds on the first call)."""
    library()
    return _state["why"]
