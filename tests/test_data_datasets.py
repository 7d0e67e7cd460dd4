"""load_fashion_mnist and load_mnist: the book's keywords, the search order, and clear failures."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

import scratchnn.data.datasets as datasets
from scratchnn.data import FASHION_MNIST_CLASSES, find_dataset_files, load_fashion_mnist, load_mnist

N_TRAIN, N_TEST = 12, 5


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def make_dataset(
    folder: Path,
    seed: int = 0,
    compress: bool | list[bool] = True,
    n_labels: int = N_TRAIN,
    image_shape: tuple[int, int] = (28, 28),
    max_label: int = 9,
) -> dict[str, np.ndarray]:
    """Write a small fake dataset in IDX form; return the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, *image_shape)),
        "train-labels-idx1-ubyte": rng.integers(0, max_label + 1, n_labels),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, *image_shape)),
        "t10k-labels-idx1-ubyte": rng.integers(0, max_label + 1, N_TEST),
    }
    arrays["train-labels-idx1-ubyte"][0] = max_label
    flags = compress if isinstance(compress, list) else [compress] * 4
    for (stem, array), flag in zip(arrays.items(), flags, strict=True):
        write_idx(folder / stem, array, flag)
    return arrays


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No SCRATCHNN_DATA, an empty download cache, and no Debian folder."""
    monkeypatch.delenv("SCRATCHNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")
    return tmp_path


@pytest.mark.parametrize(
    "compress", [True, False, [True, False, False, True]], ids=["gz", "raw", "mixed"]
)
def test_book_defaults(isolated: Path, compress: bool | list[bool]) -> None:
    arrays = make_dataset(isolated / "data", compress=compress)
    (x_train, t_train), (x_test, t_test) = load_fashion_mnist(isolated / "data")
    assert x_train.shape == (N_TRAIN, 784) and x_test.shape == (N_TEST, 784)
    assert x_train.dtype == np.float32
    expected = arrays["train-images-idx3-ubyte"].reshape(N_TRAIN, 784) / 255.0
    np.testing.assert_allclose(x_train, expected, rtol=1e-7)
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert t_train.shape == (N_TRAIN,) and t_train.dtype == np.uint8
    np.testing.assert_array_equal(t_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(t_test, arrays["t10k-labels-idx1-ubyte"])


def test_unnormalized_unflattened_one_hot(isolated: Path) -> None:
    arrays = make_dataset(isolated / "data")
    (x_train, t_train), (x_test, t_test) = load_mnist(
        isolated / "data", normalize=False, flatten=False, one_hot_label=True
    )
    assert x_train.dtype == np.uint8 and x_train.shape == (N_TRAIN, 1, 28, 28)
    np.testing.assert_array_equal(x_train[:, 0], arrays["train-images-idx3-ubyte"])
    assert x_test.shape == (N_TEST, 1, 28, 28)
    assert t_train.shape == (N_TRAIN, 10) and t_train.dtype == np.float32
    assert t_test.shape == (N_TEST, 10)
    np.testing.assert_array_equal(t_train.argmax(axis=1), arrays["train-labels-idx1-ubyte"])
    assert (t_train.sum(axis=1) == 1).all() and set(np.unique(t_train)) <= {0.0, 1.0}


def test_dtype_keyword(isolated: Path) -> None:
    make_dataset(isolated / "data")
    (x_train, t_train), _ = load_fashion_mnist(
        isolated / "data", dtype=np.float64, one_hot_label=True
    )
    assert x_train.dtype == np.float64 and t_train.dtype == np.float64
    with pytest.raises(TypeError, match="dtype must be float16, float32 or float64"):
        load_fashion_mnist(isolated / "data", dtype=np.int32)


def test_search_order_environment_then_cache_then_debian(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian = make_dataset(isolated / "debian", seed=1)
    (_, t), _ = load_fashion_mnist()
    np.testing.assert_array_equal(t, debian["train-labels-idx1-ubyte"])

    cache = make_dataset(isolated / "xdg" / "scratchnn" / "fashion-mnist", seed=2)
    (_, t), _ = load_fashion_mnist()
    np.testing.assert_array_equal(t, cache["train-labels-idx1-ubyte"])

    direct = make_dataset(isolated / "env", seed=3)
    monkeypatch.setenv("SCRATCHNN_DATA", str(isolated / "env"))
    (_, t), _ = load_fashion_mnist()
    np.testing.assert_array_equal(t, direct["train-labels-idx1-ubyte"])

    # The dataset's own subfolder wins over files directly in SCRATCHNN_DATA.
    subfolder = make_dataset(isolated / "env" / "fashion-mnist", seed=4)
    (_, t), _ = load_fashion_mnist()
    np.testing.assert_array_equal(t, subfolder["train-labels-idx1-ubyte"])


def test_mnist_uses_its_own_subfolders_and_never_the_debian_one(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_dataset(isolated / "debian")
    make_dataset(isolated / "env" / "fashion-mnist")
    monkeypatch.setenv("SCRATCHNN_DATA", str(isolated / "env"))
    with pytest.raises(FileNotFoundError) as info:
        load_mnist()
    message = str(info.value)
    assert "debian" not in message and "apt-get" not in message
    assert str(isolated / "env" / "mnist") in message
    assert "scratchnn data download mnist" in message
    mnist = make_dataset(isolated / "env" / "mnist", seed=5)
    assert (
        find_dataset_files("mnist")["t10k-labels-idx1-ubyte"].parent == isolated / "env" / "mnist"
    )
    (_, t), _ = load_mnist()
    np.testing.assert_array_equal(t, mnist["train-labels-idx1-ubyte"])


def pin_labels_as(monkeypatch: pytest.MonkeyPatch, labels: np.ndarray, name: str) -> None:
    """Take ``labels``' first ten as dataset ``name``'s fingerprint, as the real files' are."""
    fingerprints = {**datasets.FIRST_TRAIN_LABELS, name: labels[:10].astype(np.uint8).tobytes()}
    monkeypatch.setattr(datasets, "FIRST_TRAIN_LABELS", fingerprints)


def test_the_other_datasets_files_are_passed_over(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fashion-MNIST straight in SCRATCHNN_DATA (as SCRATCHNN_DATA=/usr/share/datasets/
    # fashion-mnist gives): the same file names as MNIST's, never loaded as MNIST.
    fashion = make_dataset(isolated / "env")
    pin_labels_as(monkeypatch, fashion["train-labels-idx1-ubyte"], "fashion-mnist")
    monkeypatch.setenv("SCRATCHNN_DATA", str(isolated / "env"))
    with pytest.raises(FileNotFoundError) as info:
        load_mnist()
    assert f"{isolated / 'env'}: holds fashion-mnist (its training labels), not mnist" in str(
        info.value
    )
    assert load_fashion_mnist()[0][0].shape == (N_TRAIN, 784)
    with pytest.raises(FileNotFoundError, match="holds fashion-mnist"):
        load_mnist(isolated / "env")  # an explicit path is checked too
    mnist = make_dataset(isolated / "env" / "mnist", seed=6)
    (_, t), _ = load_mnist()
    np.testing.assert_array_equal(t, mnist["train-labels-idx1-ubyte"])


def test_real_fashion_mnist_is_not_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not datasets.DEBIAN_FASHION_MNIST_DIR.is_dir():
        pytest.skip(
            f"{datasets.DEBIAN_FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)"
        )
    monkeypatch.setenv("SCRATCHNN_DATA", str(datasets.DEBIAN_FASHION_MNIST_DIR))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds fashion-mnist"):
        load_mnist()
    # The training labels uncompressed, or compressed again (other bytes than the published
    # .gz): still refused. (Only the labels are read to tell the datasets apart.)
    labels = "train-labels-idx1-ubyte"
    for compress in (False, True):
        copy = tmp_path / f"copy-{compress}"
        copy.mkdir()
        for packed in datasets.DEBIAN_FASHION_MNIST_DIR.glob("*.gz"):
            if not packed.name.startswith(labels):
                (copy / packed.name).symlink_to(packed)
        data = gzip.decompress((datasets.DEBIAN_FASHION_MNIST_DIR / f"{labels}.gz").read_bytes())
        if compress:
            (copy / f"{labels}.gz").write_bytes(gzip.compress(data, compresslevel=1, mtime=1))
        else:
            (copy / labels).write_bytes(data)
        with pytest.raises(FileNotFoundError, match="holds fashion-mnist"):
            load_mnist(copy)
    assert load_fashion_mnist(copy)[0][1].shape == (60000,)


def test_an_unknown_dataset_name_is_refused_with_or_without_a_path(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    for args in [("Fashion-MNIST", tmp_path), ("foo",)]:
        with pytest.raises(ValueError, match=f"unknown dataset '{args[0]}'"):
            find_dataset_files(*args)


def test_not_found_lists_every_place_and_how_to_get_the_data(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist()
    assert str(isolated / "xdg" / "scratchnn" / "fashion-mnist") in str(info.value)
    assert str(isolated / "debian") in str(info.value)

    # With SCRATCHNN_DATA set, the download cache is its fashion-mnist subfolder.
    partial = isolated / "env"
    monkeypatch.setenv("SCRATCHNN_DATA", str(partial))
    make_dataset(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist()
    message = str(info.value)
    assert f"{partial}: missing t10k-labels-idx1-ubyte\n" in message
    assert f"{partial / 'fashion-mnist'}: no such folder" in message
    assert str(isolated / "debian") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "scratchnn data download fashion-mnist" in message


def test_explicit_path_is_the_only_place_looked(isolated: Path) -> None:
    make_dataset(isolated / "debian")
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(isolated / "typo")
    assert f"{isolated / 'typo'}: no such folder" in str(info.value)
    assert str(isolated / "debian") not in str(info.value)
    assert "SCRATCHNN_DATA" not in str(info.value)  # not searched, so no remedy
    (isolated / "file").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="file: a file, not a folder"):
        load_fashion_mnist(isolated / "file")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_labels": N_TRAIN - 1}, "12 images in .* but 11 labels"),
        ({"max_label": 10}, "labels must be 0..9, found 10"),
        ({"image_shape": (27, 28)}, r"shape \(N, 28, 28\)"),
    ],
)
def test_inconsistent_files_raise_value_error(isolated: Path, options: dict, message: str) -> None:
    make_dataset(isolated / "data", **options)
    with pytest.raises(ValueError, match=message):
        load_fashion_mnist(isolated / "data")


def test_class_names() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert FASHION_MNIST_CLASSES[7] == "Sneaker"


def test_loads_the_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not datasets.DEBIAN_FASHION_MNIST_DIR.is_dir():
        pytest.skip(
            f"{datasets.DEBIAN_FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)"
        )
    monkeypatch.delenv("SCRATCHNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (x_train, t_train), (x_test, t_test) = load_fashion_mnist()
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert t_train.shape == (60000,) and t_test.shape == (10000,)
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    assert set(np.unique(t_train)) == set(range(10)) == set(np.unique(t_test))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_a_runs_data_is_normalised_in_its_dtype(isolated: Path, dtype: str) -> None:
    from scratchnn.runs import RunConfig, load_data

    arrays = make_dataset(isolated / "data")
    config = RunConfig(dtype=dtype, limit=7)
    (x_train, t_train), (x_test, _) = load_data(config, str(isolated / "data"))
    assert x_train.dtype == x_test.dtype == np.dtype(dtype)
    assert x_train.shape == (7, 784) and t_train.shape == (7,)
    # Correctly rounded in the run's dtype (a float32 quotient cast to float64 is not).
    exact = arrays["train-images-idx3-ubyte"][:7].reshape(7, 784) / np.float64(255)
    np.testing.assert_array_equal(x_train, exact.astype(dtype))
    assert x_train.base is None or x_train.base.size == x_train.size  # not a view of all 12


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"dtype": None}, TypeError, "load_fashion_mnist: dtype must be float16, float32 or float64, got None"),
        ({"dtype": np.longdouble}, TypeError, "load_fashion_mnist: dtype must be float16"),
        ({"normalize": "False"}, TypeError, "load_fashion_mnist: normalize must be True or False"),
        ({"flatten": None}, TypeError, "load_fashion_mnist: flatten must be True or False"),
        ({"one_hot_label": "no"}, TypeError, "load_fashion_mnist: one_hot_label must be True or False"),
    ],
)
def test_the_loaders_keywords_are_checked(
    kwargs: dict, error: type, message: str, tmp_path: Path
) -> None:
    # Each was taken: None as float64, the strings as true, None as false.
    make_dataset(tmp_path / "data")
    with pytest.raises(error, match=message):
        load_fashion_mnist(tmp_path / "data", **kwargs)


def test_a_big_endian_dtype_gives_native_arrays(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data")
    (x, t), _ = load_fashion_mnist(tmp_path / "data", dtype=">f4", one_hot_label=True)
    (x32, t32), _ = load_fashion_mnist(tmp_path / "data", dtype=np.float32, one_hot_label=True)
    assert x.dtype == t.dtype == np.dtype(np.float32) and x.dtype.isnative
    np.testing.assert_array_equal(x, x32)
    np.testing.assert_array_equal(t, t32)


def test_a_small_gzip_that_would_expand_beyond_the_data_set_is_refused_unread(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1.3 million zero images in a 1 MB gzip: read in full (1 GB, and 4 GB as floats) before
    # the loader looked. Its header claims more than the data set's 70,000 images can be.
    make_dataset(isolated / "data")
    n = datasets.MAX_EXAMPLES + 1
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", n, 28, 28)
    bomb = isolated / "data" / "train-images-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as stream:
        stream.write(header)
        stream.write(bytes(n * 28 * 28))
    read: list[int] = []
    original = gzip.GzipFile.read

    def counted(self: gzip.GzipFile, size: int = -1) -> bytes:
        data = original(self, size)
        read.append(len(data))
        return data

    monkeypatch.setattr(gzip.GzipFile, "read", counted)
    with pytest.raises(ValueError, match=r"more than the 54880000 bytes this file may hold"):
        load_fashion_mnist(isolated / "data")
    assert sum(read) < 1024  # the header, not the 55 MB behind it
