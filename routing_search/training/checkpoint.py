"""Atomic, safe-to-load checkpoints.

* :func:`save_checkpoint` writes to a temporary file in the target directory, flushes and fsyncs it, and
  only then moves it into place, so a crash never leaves a half-written checkpoint under the real name.
  It refuses to replace an existing file unless ``overwrite=True``.
* :func:`load_checkpoint` uses ``torch.load(weights_only=True)`` (no arbitrary code runs on load) and
  turns every failure (missing, truncated, corrupt, foreign file) into a :class:`CheckpointError` that
  names the path. Loading never writes to the file.
* :func:`check_compatible` compares a checkpoint's model state (keys, shapes, dtypes) with a model before
  anything is loaded.
* Every file carries a SHA-256 checksum of its content (:func:`state_checksum`: every tensor's dtype,
  shape and bytes, and every other value), verified on load: a flipped bit inside a tensor is refused.
* Files are created with the permissions the user's umask gives ordinary files (e.g. 0644), so
  teammates can read shared runs.

Only weights_only-loadable values may be stored: tensors, Python scalars, strings, ``None``, and
lists / tuples / dicts of those. :func:`to_plain` converts numpy values (e.g. a numpy generator's state).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..gates.annealed import AnnealedGate

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "check_compatible",
    "to_plain",
    "state_checksum",
    "FORMAT",
    "VERSION",
]

FORMAT = "routing_search.checkpoint"
VERSION = 2  # 2: adds the checksum (version 1 files, without one, still load)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, foreign or incompatible."""


def to_plain(value: Any) -> Any:
    """Recursively turn numpy arrays / scalars into lists / Python scalars (tuples become lists)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _feed(digest: Any, value: Any) -> None:
    """Add ``value`` to ``digest`` in a canonical, type-tagged form."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)};".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)};".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, str):
        encoded = value.encode()
        digest.update(f"S{len(encoded)};".encode() + encoded)
    else:
        digest.update(f"V{type(value).__name__}:{value!r};".encode())


def state_checksum(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``state`` without its ``'checksum'`` entry: tensors by dtype, shape and bytes."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != "checksum"})
    return digest.hexdigest()


def _create_file(directory: Path, name: str) -> tuple[int, Path]:
    """A new, uniquely named file opened for writing, with the umask's ordinary permissions (e.g. 0644)."""
    for _ in range(100):
        path = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {str(directory)!r}")


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); silently skipped where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory; the rename stands
            os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Atomically write ``state`` (plus a format tag, version and checksum) to ``path``; returns the path.

    The file gets the permissions of an ordinary new file under the process's umask (0644 under the
    usual umask 022).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (the existing file is untouched).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint path {str(path)!r} is a directory; give a file name such as checkpoint.pt")
    if path.exists() and not overwrite:
        raise FileExistsError(f"checkpoint {str(path)!r} already exists; pass overwrite=True to replace it")
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **{k: v for k, v in state.items() if k not in ("format", "version", "checksum")}}
    payload["checksum"] = state_checksum(payload)
    fd, tmp = _create_file(directory, path.name)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # os.link fails if `path` appeared meanwhile, so an existing file can never be clobbered.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"checkpoint {str(path)!r} already exists; pass overwrite=True to replace it") from None
            except OSError:  # hard links unsupported on this file system
                if path.exists():
                    raise FileExistsError(f"checkpoint {str(path)!r} already exists; pass overwrite=True to replace it") from None
                os.replace(tmp, path)
            else:
                tmp.unlink()
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_directory(directory)
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated or corrupt (including a content
            that does not match its checksum), or is not a routing_search checkpoint of a supported
            version. The message names the path; the file is never modified.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {str(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files (RuntimeError, EOFError, UnpicklingError, ...)
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read; it is corrupt, truncated or not a torch file "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a routing_search checkpoint (format tag {FORMAT!r} missing)")
    version = state.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has version {version!r}; this routing_search reads versions 1..{VERSION}")
    if version >= 2:
        stored = state.get("checksum")
        if not isinstance(stored, str) or stored != state_checksum(state):
            raise CheckpointError(
                f"checkpoint {str(path)!r} failed its checksum: its content was damaged after it was written "
                "(disk or copy error, or an edit). The file was left as it is; resume from another copy"
            )
    return state


def _may_be_absent(model: nn.Module, key: str) -> bool:
    """True for a DSelect-k / COMET gate's annealing record (module extra state), which checkpoints
    written before it was saved lack; the gate loads them as before."""
    if not key.endswith("_extra_state"):
        return False
    try:
        module = model.get_submodule(key[: -len("_extra_state")].rstrip("."))
    except AttributeError:
        return False
    return isinstance(module, AnnealedGate)


def check_compatible(checkpoint: Mapping[str, Any], model: nn.Module, *, path: str | os.PathLike | None = None) -> None:
    """Check that ``checkpoint['model']`` (or ``checkpoint`` itself if it is a state dict) fits ``model``.

    Raises:
        CheckpointError: listing missing keys, unexpected keys, and shape and dtype mismatches.
    """
    saved = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    where = f"checkpoint {str(path)!r}" if path is not None else "checkpoint"
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{where} holds no model state dict")
    current = model.state_dict()
    problems = []
    missing = [k for k in current if k not in saved and not _may_be_absent(model, k)]
    unexpected = [k for k in saved if k not in current]
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    dtypes: dict[tuple[torch.dtype, torch.dtype], list[str]] = {}
    for key, value in current.items():
        old = saved.get(key)
        if isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor):
            if old.shape != value.shape:
                problems.append(f"{key}: checkpoint shape {tuple(old.shape)} vs model shape {tuple(value.shape)}")
            elif old.dtype != value.dtype:  # load_state_dict would cast silently (a float64 run resumed in float32)
                dtypes.setdefault((old.dtype, value.dtype), []).append(key)
    for (was, now), keys in dtypes.items():
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        problems.append(f"checkpoint dtype {was} vs model dtype {now} ({shown}); build the model in {was} as for the original run")
    if problems:
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(problems))
