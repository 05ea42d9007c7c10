"""The CPU backend's set-up states: every way the BLAS or the GEMM shim can be missing is
reported (status and one warning), and the BLAS stays loaded whatever happens to the shim.

Most tests import mlx_specstream in a child process with a modified environment and a
fresh cache folder (MLX_SPECSTREAM_HOME), so that no cached build is reused.  Fake
compilers (shell scripts) stand in for real compiles: a "successful" one copies the shim
this process loaded."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

from mlx_specstream import backend, doctor
from mlx_specstream.backend import blas, shim

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_linux_blas = pytest.mark.skipif(
    not sys.platform.startswith("linux") or blas.find_blas() is None,
    reason="needs Linux with a system OpenBLAS",
)
needs_shim = pytest.mark.skipif(not shim.STATUS.active, reason="no GEMM shim in this process")

CHILD = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    {pre}
    import mlx_specstream
from mlx_specstream import backend
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a, b = (rng.standard_normal(s).astype(np.float32) for s in ((5, 64), (64, 48)))
matmul_ok = bool(np.allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4, atol=1e-4))
print(json.dumps({{"report": backend.report(), "matmul_ok": matmul_ok,
                  "warnings": [str(w.message) for w in caught
                               if issubclass(w.category, RuntimeWarning)]}}))
"""

_CLEARED = ("CC", "MLX_SPECSTREAM_SHIM", "MLX_SPECSTREAM_BLAS", "MLX_SPECSTREAM_SKINNY_M",
            "MLX_SPECSTREAM_CC_TIMEOUT", "MLX_SPECSTREAM_ONE_POOL")


def child(tmp_path: Path, pre: str = "pass", **env: str) -> tuple[dict, list[str]]:
    """Import mlx_specstream in a fresh process; returns (backend.report(), warnings).
    Whatever the state, MLX must still multiply correctly (the fallback works)."""
    full = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                          full.get("PYTHONPATH", "")])
    full.setdefault("MLX_SPECSTREAM_HOME", str(tmp_path / "home"))
    full.update(env)
    out = subprocess.run([sys.executable, "-c", CHILD.format(pre=pre)], env=full,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["matmul_ok"], data["report"]
    return data["report"], data["warnings"]


def fake_cc(folder: Path, body: str) -> Path:
    """A shell script posing as a C compiler."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fake-cc"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def copying_cc(folder: Path, refuse: str | None = None) -> Path:
    """A fake compiler that 'builds' the shim by copying this process's one; it fails
    with an error message when an argument equals ``refuse``."""
    check = ""
    if refuse:
        check = (f'for a in "$@"; do [ "$a" = "{refuse}" ] && '
                 f'{{ echo "fake-cc: error: unrecognized option {refuse}" >&2; exit 1; }}; done\n')
    return fake_cc(folder, check + 'out=""; prev=""\n'
                   'for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done\n'
                   f'cp "{shim.STATUS.path}" "$out"\n')


def shim_warnings(warns: list[str]) -> list[str]:
    return [w for w in warns if "GEMM shim" in w]


# --- the shim missing: the BLAS is still loaded, one warning says why -------------------


@needs_linux_blas
def test_no_compiler_at_all(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    report, warns = child(tmp_path, PATH=str(empty))
    assert report["blas"]["state"] == "loaded"
    assert report["shim"]["state"] == "failed"
    assert "no C compiler" in report["shim"]["reason"]
    assert len(shim_warnings(warns)) == 1 and "no C compiler" in shim_warnings(warns)[0]
    assert report["weight_alignment"]["enabled"] is False


@needs_linux_blas
def test_bad_cc(tmp_path: Path) -> None:
    report, warns = child(tmp_path, CC="/nonexistent/cc")
    assert report["blas"]["state"] == "loaded"
    assert report["shim"]["state"] == "failed"
    assert "/nonexistent/cc" in report["shim"]["reason"]
    assert len(shim_warnings(warns)) == 1 and "/nonexistent/cc" in shim_warnings(warns)[0]


@needs_linux_blas
def test_unwritable_cache_folder_keeps_the_blas(tmp_path: Path) -> None:
    """The cache root lies under a regular file: no one, root included, can create it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    report, warns = child(tmp_path, MLX_SPECSTREAM_HOME=str(blocker / "home"))
    assert report["blas"]["state"] == "loaded"
    assert report["shim"]["state"] == "failed"
    assert "not writable" in report["shim"]["reason"]
    assert report["shim"]["cache_dir"] == str(blocker / "home" / "blas")
    assert len(shim_warnings(warns)) == 1 and "MLX_SPECSTREAM_HOME" in shim_warnings(warns)[0]


@needs_linux_blas
def test_every_flag_set_failing_warns_with_the_compilers_errors(tmp_path: Path) -> None:
    cc = fake_cc(tmp_path / "bin", 'echo "shim.c:1: error: no luck today" >&2\n'
                 'echo "second line" >&2\nexit 1\n')
    report, warns = child(tmp_path, CC=str(cc))
    assert report["blas"]["state"] == "loaded"
    assert report["shim"]["state"] == "failed"
    assert len(report["shim"]["failed_flags"]) == len(shim.FLAG_SETS)
    [warning] = shim_warnings(warns)
    assert str(cc) in warning and "no luck today" in warning and "second line" in warning


@needs_linux_blas
def test_compile_timeout(tmp_path: Path) -> None:
    cc = fake_cc(tmp_path / "bin", "sleep 30\n")
    t = time.monotonic()
    report, warns = child(tmp_path, CC=str(cc), MLX_SPECSTREAM_CC_TIMEOUT="1")
    assert time.monotonic() - t < 20  # one flag set tried, not one per set
    assert report["blas"]["state"] == "loaded"
    assert report["shim"]["state"] == "failed"
    assert "did not finish within 1 s" in report["shim"]["reason"]
    assert len(shim_warnings(warns)) == 1


@needs_linux_blas
def test_a_compiler_that_writes_no_library(tmp_path: Path) -> None:
    cc = fake_cc(tmp_path / "bin", "exit 0\n")
    report, warns = child(tmp_path, CC=str(cc))
    assert report["blas"]["state"] == "loaded"
    assert report["shim"]["state"] == "failed"
    assert "exit 0 but no" in report["shim"]["reason"]
    assert len(shim_warnings(warns)) == 1


@needs_linux_blas
def test_a_broken_library_is_reported_with_the_way_out(tmp_path: Path) -> None:
    """A compiler that writes something that is not a loadable library: the shim fails
    with a reason naming the file to delete, and the BLAS is still used."""
    cc = fake_cc(tmp_path / "bin", 'out=""; prev=""\n'
                 'for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done\n'
                 'echo "not an ELF file" > "$out"\n')
    report, warns = child(tmp_path, CC=str(cc))
    assert report["blas"]["state"] == "loaded"
    assert report["shim"]["state"] == "failed"
    assert "cannot load" in report["shim"]["reason"] and "delete it" in report["shim"]["reason"]
    [warning] = shim_warnings(warns)
    assert "cannot load" in warning


def test_build_timeout_kills_the_compilers_children(tmp_path: Path, monkeypatch) -> None:
    """In process: a timed-out compiler and what it started are ended, within the bound."""
    marker = tmp_path / "still-running"
    cc = fake_cc(tmp_path / "bin", f'(sleep 3; touch "{marker}") &\nwait\n')
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("MLX_SPECSTREAM_HOME", str(tmp_path / "home"))
    t = time.monotonic()
    result = shim.build(timeout=0.5)
    assert time.monotonic() - t < 2.5
    assert result.path is None and "did not finish within 0.5 s" in result.reason
    time.sleep(3.5)
    assert not marker.exists()


# --- flag sets and the cache key -------------------------------------------------------


@needs_linux_blas
@needs_shim
def test_a_failing_flag_set_falls_back_to_the_next(tmp_path: Path) -> None:
    cc = copying_cc(tmp_path / "bin", refuse="-march=native")
    report, warns = child(tmp_path, CC=str(cc))
    s = report["shim"]
    assert report["blas"]["state"] == "loaded"
    assert s["state"] == "active" and s["flags"] == ["-fopenmp"] and not s["cached"]
    assert s["compiler"] == str(cc)
    assert s["failed_flags"][0][0] == ["-march=native", "-fopenmp"]
    assert "unrecognized option -march=native" in s["failed_flags"][0][1]
    assert Path(s["path"]).name == shim.library_name(("-fopenmp",))
    assert "_fopenmp_" in Path(s["path"]).name and "march" not in Path(s["path"]).name
    assert not shim_warnings(warns)
    # The next import finds that build in the cache, and says which compiler made it.
    report, warns = child(tmp_path, CC=str(cc))
    assert report["shim"]["cached"] and report["shim"]["path"] == s["path"]
    assert report["shim"]["compiler"] == str(cc) and report["shim"]["flags"] == ["-fopenmp"]


@needs_shim
def test_the_cache_key_holds_the_flag_set(tmp_path: Path, monkeypatch) -> None:
    names = {shim.library_name(f) for f in shim.FLAG_SETS}
    assert len(names) == len(shim.FLAG_SETS)
    assert shim.library_name(("-march=native", "-fopenmp")).startswith(
        "libmlxss_cblas_march-native_fopenmp_")
    assert shim.library_name(()).startswith("libmlxss_cblas_plain_")
    log = tmp_path / "calls"
    cc = copying_cc(tmp_path / "bin")
    cc.write_text(cc.read_text().replace("#!/bin/sh\n", f'#!/bin/sh\necho "$*" >> "{log}"\n'))
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("MLX_SPECSTREAM_HOME", str(tmp_path / "home"))
    first = shim.build(flag_sets=(("-mavx", "-mfma"),))
    again = shim.build(flag_sets=(("-mavx", "-mfma"),))
    other = shim.build(flag_sets=(("-mavx",),))  # AVX without FMA: never the first build
    assert first.path and not first.cached and again.cached and again.path == first.path
    assert other.path and not other.cached and other.path != first.path
    assert len(log.read_text().splitlines()) == 2
    monkeypatch.setattr(shim, "machine_tag", lambda: "another CPU")
    assert shim.library_name(("-mavx",)) != other.path.name


# --- other states ----------------------------------------------------------------------


@needs_linux_blas
def test_shim_disabled_by_env(tmp_path: Path) -> None:
    report, warns = child(tmp_path, MLX_SPECSTREAM_SHIM="0", PATH="/nonexistent")
    assert report["blas"]["state"] == "loaded"
    assert report["shim"]["state"] == "disabled" and not shim_warnings(warns)
    assert report["weight_alignment"]["enabled"] is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_blas_disabled_by_env(tmp_path: Path) -> None:
    report, warns = child(tmp_path, MLX_SPECSTREAM_BLAS="none")
    assert report["blas"]["state"] == "disabled" and "MLX_SPECSTREAM_BLAS=none" in \
        report["blas"]["reason"]
    assert report["shim"]["state"] == "not-applicable" and not warns


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_a_named_blas_that_does_not_load(tmp_path: Path) -> None:
    report, warns = child(tmp_path, MLX_SPECSTREAM_BLAS="/nonexistent/libopenblas.so")
    assert report["blas"]["state"] == "load-failed"
    assert "/nonexistent/libopenblas.so" in report["blas"]["reason"]
    assert report["shim"]["state"] == "not-applicable"
    assert any("/nonexistent/libopenblas.so" in w for w in warns)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_mlx_core_imported_first_is_too_late(tmp_path: Path) -> None:
    report, warns = child(tmp_path, pre="import mlx.core")
    assert report["blas"]["state"] == "too-late"
    assert report["shim"]["state"] == "not-applicable"
    assert any("mlx.core was imported before mlx_specstream" in w for w in warns)


# --- the C source and the doctor -------------------------------------------------------


def test_the_c_source_is_package_data() -> None:
    src = shim.source()
    assert "void cblas_sgemm(" in src and "mlxss_init" in src


_X86_FLAG_SETS = ["", "-mavx", "-mavx2", "-mfma", "-mavx2 -mfma", "-mavx512f -mno-fma",
                  "-mavx512f", "-march=sandybridge", "-march=x86-64-v3"]


@pytest.mark.skipif(os.uname().machine != "x86_64" or shutil.which("gcc") is None,
                    reason="x86-64 with gcc")
@pytest.mark.parametrize("flags", _X86_FLAG_SETS)
def test_the_c_source_compiles_for_every_instruction_set(tmp_path: Path, flags: str) -> None:
    """Each intrinsic is guarded by the macro of the instruction set it needs (e.g. AVX
    without FMA, AVX-512 without FMA)."""
    src = tmp_path / "shim.c"
    src.write_text(shim.source())
    out = subprocess.run(["gcc", "-fsyntax-only", "-fopenmp", *flags.split(), str(src)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_doctor_reports_every_backend_state() -> None:
    lines = "\n".join(doctor.backend_lines(backend.report()))
    for label in ("BLAS", "GEMM shim", "compiler", "flags", "cache", "weight alignment"):
        assert label in lines
    failed = {
        "blas": {"state": "loaded", "reason": "found", "path": "/lib/libopenblas.so.0"},
        "shim": {"state": "failed", "reason": "build failed: /usr/bin/cc failed\nerror: x",
                 "path": None, "compiler": "/usr/bin/cc", "flags": None, "cached": False,
                 "max_m": 0, "cache_dir": "/c/blas",
                 "failed_flags": [[["-march=native"], "error: x"]]},
        "weight_alignment": {"enabled": False, "reason": "the GEMM shim is failed"},
    }
    lines = "\n".join(doctor.backend_lines(failed))
    assert "GEMM shim         : failed: build failed: /usr/bin/cc failed" in lines
    assert "compiler        : /usr/bin/cc" in lines and "/c/blas" in lines
    assert "failed flag set : -march=native: error: x" in lines
    assert "weight alignment  : off" in lines
