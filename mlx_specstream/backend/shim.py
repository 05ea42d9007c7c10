"""The GEMM shim in front of the BLAS: built from ``shim.c`` once per machine with the
system C compiler, cached, and loaded before ``mlx.core`` so that MLX binds to its
``cblas_sgemm``/``cblas_dgemm``.

Decode-time GEMMs are skinny (1 to 16 activation rows against a whole weight matrix),
where OpenBLAS's packing GEMM reaches only about a third of the memory bandwidth.  The
shim computes those as dot products that read each weight once (2-3x faster on the LM
head here) and hands every other call to the BLAS (see ``shim.c``).

The build tries the flag sets of ``FLAG_SETS`` in order (``-march=native``/``-fopenmp``
may be refused by the compiler or the linker).  The library's file name in
``<cache>/blas/`` holds the flag set it was built with and a digest of the source, the
base flags, that flag set and the CPU, so a build is only reused for exactly what it is.
An existing build of an earlier flag set is preferred; otherwise the first cached one is
used before anything is compiled.  Every way the shim can be missing is recorded in
``STATUS`` and reported by one ``RuntimeWarning`` (the BLAS is then used directly).

Environment: ``MLX_SPECSTREAM_SHIM=0`` disables the shim; ``MLX_SPECSTREAM_SKINNY_M`` sets
the skinny kernel's row limit (0: off, the shim only forwards); ``CC`` chooses the
compiler (else ``cc``, ``gcc`` or ``clang`` on ``PATH``); ``MLX_SPECSTREAM_CC_TIMEOUT``
bounds each compiler run (seconds, default 120); ``MLX_SPECSTREAM_HOME`` moves the cache
(default ``~/.cache/mlx-specstream``); ``MLX_SPECSTREAM_ONE_POOL=0`` keeps the BLAS's own
thread pool.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import importlib.resources
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..files import cache_root

#: Largest number of activation rows the skinny kernel takes.  16 covers a 4-node draft
#: chain with its 3 streams per node in the MSA layers, so that the whole verification
#: pass is batch-invariant.  Measured on the project's 2-core Zen 5 machines (SmolLM2,
#: context 256, medians of 6 alternating runs against the previous one-column kernel): a
#: 1-token pass 24.8 ms either way, a 4-node pass with streams 41.8 vs 44.2 ms, a
#: 16-node pass with streams 92.8 vs 106.2 ms.  ``MLX_SPECSTREAM_SKINNY_M`` overrides;
#: 0 turns the kernel off (the shim then only forwards).
SKINNY_MAX_M = 16

#: Flags of every build.  No FMA contraction: every path sums a row the same way
#: (batch-invariant rows); the kernel's fused multiply-adds are explicit intrinsics.
CFLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")
#: Extra flags, tried in this order until one set compiles and links.
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-march=native", "-fopenmp"),
    ("-fopenmp",),
    ("-march=native",),
    (),
)
#: Seconds one compiler run may take (``MLX_SPECSTREAM_CC_TIMEOUT`` overrides).
DEFAULT_TIMEOUT_S = 120.0
#: Lines of the compiler's error output quoted in a warning.
STDERR_LINES = 4


class ShimState(str, enum.Enum):
    UNSET = "unset"  # setup() has not run
    ACTIVE = "active"
    DISABLED = "disabled"  # MLX_SPECSTREAM_SHIM=0
    FAILED = "failed"  # wanted, but not built or not loaded: see the reason
    NOT_APPLICABLE = "not-applicable"  # no BLAS loaded by mlx_specstream (or not Linux)


@dataclass
class ShimStatus:
    """What happened to the shim in this process, and why."""

    state: ShimState = ShimState.UNSET
    reason: str = ""
    #: The loaded library (ACTIVE), or None.
    path: Path | None = None
    #: The compiler command that built it (or that failed), when known.
    compiler: str | None = None
    #: The extra flags it was built with (ACTIVE), see FLAG_SETS.
    flags: tuple[str, ...] | None = None
    #: Whether the library came from the cache (no compile in this process).
    cached: bool = False
    #: The skinny kernel's row limit (0 when off or when the shim is not active).
    max_m: int = 0
    #: Flag sets that failed in this process, with the first line of the compiler's error.
    failed_flags: list[tuple[tuple[str, ...], str]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state is ShimState.ACTIVE

    def as_dict(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "reason": self.reason,
            "path": str(self.path) if self.path else None,
            "compiler": self.compiler,
            "flags": list(self.flags) if self.flags is not None else None,
            "cached": self.cached,
            "max_m": self.max_m,
            "cache_dir": str(cache_dir()),
            "failed_flags": [[list(f), err] for f, err in self.failed_flags],
        }


STATUS = ShimStatus()


def cache_home() -> Path:
    """The package's cache root (:func:`mlx_specstream.files.cache_root`)."""
    return cache_root()


def cache_dir() -> Path:
    """Where built shims are kept."""
    return cache_home() / "blas"


def source() -> str:
    """The shim's C source (package data)."""
    return importlib.resources.files(__package__).joinpath("shim.c").read_text()


def machine_tag() -> str:
    """The CPU the shim is compiled for (``-march=native`` builds are CPU-specific)."""
    tag = os.uname().machine
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    tag += line
    except OSError:
        pass
    return tag


def library_name(flags: tuple[str, ...], src: str | None = None) -> str:
    """The cache file name of a build with ``flags``: the flag set, readable, and a digest
    of the source, the base flags, the flag set and the CPU."""
    src = source() if src is None else src
    key = "\0".join((src, " ".join(CFLAGS), " ".join(flags), machine_tag()))
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    slug = "_".join(f.lstrip("-").replace("=", "-") for f in flags) or "plain"
    return f"libmlxss_cblas_{slug}_{digest}.so"


def find_compiler() -> tuple[list[str] | None, str]:
    """``(command, description)``: the C compiler to use (``$CC``, else ``cc``, ``gcc`` or
    ``clang`` on ``PATH``), or ``(None, why there is none)``."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        try:
            argv = shlex.split(cc)
        except ValueError as e:
            return None, f"$CC={cc!r} cannot be parsed: {e}"
        exe = shutil.which(argv[0]) if argv else None
        if exe is None:
            return None, f"the compiler $CC={cc!r} was not found"
        return [exe, *argv[1:]], shlex.join([exe, *argv[1:]])
    for name in ("cc", "gcc", "clang"):
        exe = shutil.which(name)
        if exe:
            return [exe], exe
    return None, "no C compiler found (cc, gcc or clang on PATH; or set $CC)"


def _timeout_s() -> float:
    raw = os.environ.get("MLX_SPECSTREAM_CC_TIMEOUT", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def _head(text: str, lines: int = STDERR_LINES) -> str:
    kept = [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()][:lines]
    return "\n".join(kept) if kept else "(no error output)"


@dataclass
class BuildResult:
    """The outcome of ``build``: a library path, or None and the reason."""

    path: Path | None
    reason: str
    compiler: str | None = None
    flags: tuple[str, ...] | None = None
    cached: bool = False
    failed_flags: list[tuple[tuple[str, ...], str]] = field(default_factory=list)


def _run(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run the compiler in its own process group (so that a timeout also ends the
    processes it started); returns (exit status, stderr).  Raises TimeoutExpired."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.communicate()
        raise
    return proc.returncode, (err or "") + (out or "")


def _read_meta(lib: Path) -> dict[str, object]:
    try:
        return json.loads(lib.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}


def build(flag_sets: tuple[tuple[str, ...], ...] = FLAG_SETS,
          timeout: float | None = None) -> BuildResult:
    """The shim library for this machine: a cached build when there is one, else compiled
    into the cache.  Never raises for a missing or failing compiler or an unwritable
    cache: the result then has no path and says why."""
    src = source()
    folder = cache_dir()
    candidates = [(tuple(f), folder / library_name(tuple(f), src)) for f in flag_sets]
    for flags, lib in candidates:
        if lib.is_file():
            meta = _read_meta(lib)
            compiler = meta.get("compiler") if isinstance(meta.get("compiler"), str) else None
            return BuildResult(lib, "cached build", compiler, flags, cached=True)
    cmd, cc = find_compiler()
    if cmd is None:
        return BuildResult(None, cc)
    timeout = _timeout_s() if timeout is None else timeout
    failed: list[tuple[tuple[str, ...], str]] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.TemporaryDirectory(dir=folder)
    except OSError as e:
        return BuildResult(None, f"the cache folder {folder} is not writable ({e}); set "
                           "MLX_SPECSTREAM_HOME to a writable folder", cc)
    with tmp:
        src_file = Path(tmp.name) / "shim.c"
        src_file.write_text(src)
        last_err = ""
        for flags, lib in candidates:
            out = Path(tmp.name) / lib.name
            try:
                rc, err = _run([*cmd, *CFLAGS, *flags, "-o", str(out), str(src_file)], timeout)
            except subprocess.TimeoutExpired:
                return BuildResult(None, f"{cc} {' '.join(flags)} did not finish within "
                                   f"{timeout:g} s", cc, flags, failed_flags=failed)
            except OSError as e:
                return BuildResult(None, f"cannot run {cc}: {e}", cc, failed_flags=failed)
            if rc == 0 and out.is_file():
                try:
                    out.with_suffix(".json").write_text(
                        json.dumps({"compiler": cc, "flags": list(flags)}))
                    os.replace(out.with_suffix(".json"), lib.with_suffix(".json"))
                    os.replace(out, lib)
                except OSError as e:
                    return BuildResult(None, f"cannot write {lib}: {e}", cc, flags,
                                       failed_flags=failed)
                return BuildResult(lib, "built", cc, flags, failed_flags=failed)
            last_err = _head(err) if rc != 0 else f"exit 0 but no {out.name} was written"
            failed.append((flags, last_err.splitlines()[0]))
    tried = "; ".join(" ".join(f) or "(no extra flags)" for f, _ in failed)
    return BuildResult(None, f"{cc} failed with every flag set ({tried}); last error:\n"
                       f"{last_err}", cc, failed_flags=failed)


_build_result: BuildResult | None = None
_warned = False


def warn(message: str) -> None:
    """A RuntimeWarning attributed to the first caller outside this package (the line that
    imported mlx_specstream)."""
    here = os.path.dirname(os.path.abspath(__file__))
    level, frame = 1, sys._getframe(0)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        level += 1
        frame = frame.f_back
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def _skinny_max_m() -> int:
    raw = os.environ.get("MLX_SPECSTREAM_SKINNY_M", "").strip()
    try:
        return max(0, int(raw)) if raw else SKINNY_MAX_M
    except ValueError:
        return SKINNY_MAX_M


def disabled_by_env() -> bool:
    return os.environ.get("MLX_SPECSTREAM_SHIM", "1").strip() == "0"


def _fail(reason: str, result: BuildResult | None = None) -> bool:
    global STATUS, _warned
    STATUS = ShimStatus(ShimState.FAILED, reason,
                        compiler=result.compiler if result else None,
                        flags=result.flags if result else None,
                        failed_flags=list(result.failed_flags) if result else [])
    if not _warned:
        _warned = True
        warn("mlx_specstream: no GEMM shim, the BLAS is called directly (decode-time "
             f"matmuls run slower; MLX_SPECSTREAM_SHIM=0 silences this): {reason}")
    return False


def install(lib: ctypes.CDLL, sgemm: str, dgemm: str, set_threads: str,
            required: bool = False) -> bool:
    """Build (or find) the shim, load it globally and point it at ``lib``'s GEMMs (before
    MLX looks up ``lib``'s own symbols).  ``required``: the BLAS cannot be used without the
    shim (its symbols are prefixed), so ``MLX_SPECSTREAM_SHIM=0`` does not apply.  Returns
    whether the shim is active; ``STATUS`` says why not."""
    global STATUS, _build_result
    if STATUS.active:
        return True
    if not required and disabled_by_env():
        STATUS = ShimStatus(ShimState.DISABLED, "MLX_SPECSTREAM_SHIM=0")
        return False
    # Worker threads sleep between GEMMs instead of spinning: spinning workers of two
    # processes (or one process and any other load) on a few cores starve each other;
    # measured here, two concurrent generations fell from ~28 to 0.8 tokens/s each.
    # libgomp reads this when the shim loads it, so it must be set first.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # The BLAS's functions are resolved before the shim enters the global scope: a shim
    # loaded without them would forward MLX's GEMMs to null pointers.
    try:
        s_ptr = ctypes.cast(getattr(lib, sgemm), ctypes.c_void_p)
        d_ptr = ctypes.cast(getattr(lib, dgemm), ctypes.c_void_p)
    except AttributeError as e:
        return _fail(f"the BLAS does not export {sgemm}/{dgemm}: {e}")
    try:
        t_ptr = ctypes.cast(getattr(lib, set_threads), ctypes.c_void_p)
    except AttributeError:
        t_ptr = ctypes.c_void_p(None)
    if os.environ.get("MLX_SPECSTREAM_ONE_POOL", "1").strip() == "0":
        t_ptr = ctypes.c_void_p(None)
    if _build_result is None:
        _build_result = build()
    result = _build_result
    if result.path is None:
        return _fail(f"build failed: {result.reason}", result)
    try:
        shim = ctypes.CDLL(str(result.path), mode=ctypes.RTLD_GLOBAL)
        init = shim.mlxss_init
    except (OSError, AttributeError) as e:
        return _fail(f"cannot load {result.path} ({e}); delete it to rebuild", result)
    max_m = _skinny_max_m()
    init(s_ptr, d_ptr, ctypes.c_int(max_m), t_ptr)
    STATUS = ShimStatus(ShimState.ACTIVE, result.reason, result.path, result.compiler,
                        result.flags, result.cached, max_m, list(result.failed_flags))
    return True


def not_applicable(reason: str) -> None:
    """Record that no shim was wanted (no BLAS loaded by mlx_specstream)."""
    global STATUS
    if STATUS.state is ShimState.UNSET:
        STATUS = ShimStatus(ShimState.NOT_APPLICABLE, reason)
