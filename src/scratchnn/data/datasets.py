"""Fashion-MNIST and MNIST, loaded with the book's ``load_mnist`` keywords.

The files are looked for, in order, in:

1. ``path``, when given (and only there);
2. ``$SCRATCHNN_DATA``, holding the files in a ``fashion-mnist`` or ``mnist``
   subfolder, or directly (the subfolder wins);
3. the download cache, :func:`scratchnn.data.download.default_cache_dir`;
4. ``/usr/share/datasets/fashion-mnist``, where Debian's
   ``dataset-fashion-mnist`` package puts them (Fashion-MNIST only).

Each file may be gzip-compressed (``*.gz``) or not. Unlike the book, nothing is
cached in a pickle: reading the gzip files takes well under a second.

The two datasets use the same file names and shapes, so a folder whose
training labels begin as the other dataset's do (:data:`FIRST_TRAIN_LABELS`,
read through gzip or not) is passed over: ``load_mnist`` never trains on
Fashion-MNIST by mistake, nor the reverse.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from scratchnn import _checks
from scratchnn.data.download import IDX_FILES, _check_name, default_cache_dir
from scratchnn.data.idx import read_idx

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# The first ten training labels of each published dataset: a fingerprint that holds for the
# files compressed, uncompressed or compressed again (a pinned file hash holds for one form).
FIRST_TRAIN_LABELS: dict[str, bytes] = {
    "fashion-mnist": bytes([9, 0, 0, 3, 0, 2, 7, 2, 5, 5]),
    "mnist": bytes([5, 0, 4, 1, 9, 2, 1, 3, 1, 4]),
}

Split = tuple[np.ndarray, np.ndarray]


def load_fashion_mnist(
    path: str | os.PathLike[str] | None = None,
    *,
    normalize: bool = True,
    flatten: bool = True,
    one_hot_label: bool = False,
    dtype: DTypeLike = np.float32,
) -> tuple[Split, Split]:
    """Load Fashion-MNIST as ``(x_train, t_train), (x_test, t_test)``.

    The keywords are those of the book's ``load_mnist``:

    * ``normalize``: images as ``dtype`` in [0, 1] (divided by 255); when False
      they stay ``uint8`` in 0..255.
    * ``flatten``: images of shape ``(N, 784)``; when False ``(N, 1, 28, 28)``.
    * ``one_hot_label``: labels of shape ``(N, 10)``, one-hot in ``dtype``; when
      False labels are ``uint8`` class indices of shape ``(N,)``.

    ``N`` is 60000 for training and 10000 for test; ``FASHION_MNIST_CLASSES``
    names the labels. The search order is in the module docstring; a
    ``FileNotFoundError`` lists every place looked and how to get the files.
    """
    return _load("fashion-mnist", path, normalize, flatten, one_hot_label, dtype)


def load_mnist(
    path: str | os.PathLike[str] | None = None,
    *,
    normalize: bool = True,
    flatten: bool = True,
    one_hot_label: bool = False,
    dtype: DTypeLike = np.float32,
) -> tuple[Split, Split]:
    """Load MNIST handwritten digits, exactly as :func:`load_fashion_mnist` loads Fashion-MNIST.

    MNIST is not packaged by Debian; download it with
    ``scratchnn data download mnist`` or put the four files in ``path`` or
    ``$SCRATCHNN_DATA/mnist``.
    """
    return _load("mnist", path, normalize, flatten, one_hot_label, dtype)


def find_dataset_files(name: str, path: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Find the four IDX files of ``name``; return stem (``"train-images-idx3-ubyte"``) -> path.

    Raises ``ValueError`` for an unknown name and ``FileNotFoundError`` listing
    each folder searched and what it lacked.
    """
    _check_name(name)
    searched: list[str] = []
    for folder in _candidate_dirs(name, path):
        found: dict[str, Path] = {}
        for stem in _stems():
            for candidate in (folder / f"{stem}.gz", folder / stem):
                if candidate.is_file():
                    found[stem] = candidate
                    break
        other = _other_dataset(name, found)
        if other is None and len(found) == len(IDX_FILES):
            return found
        if other is not None:
            problem = f"holds {other} (its training labels), not {name}"
        elif folder.is_file():
            problem = "a file, not a folder"
        elif not folder.is_dir():
            problem = "no such folder"
        else:
            problem = "missing " + ", ".join(stem for stem in _stems() if stem not in found)
        searched.append(f"  {folder}: {problem}")
    how = f"  scratchnn data download {name}"
    if name == "fashion-mnist":
        how = "  apt-get install dataset-fashion-mnist   (Debian, Ubuntu)\nor\n" + how
    # With an explicit path the environment is not searched, so it is no remedy.
    remedy = "" if path is not None else "\nor set SCRATCHNN_DATA to a folder that holds the files."
    raise FileNotFoundError(
        f"{name} not found (each file as <name>.gz or uncompressed). Looked in:\n"
        + "\n".join(searched)
        + f"\nGet it with:\n{how}{remedy}"
    )


def _other_dataset(name: str, found: dict[str, Path]) -> str | None:
    """The other dataset whose first training labels the folder's labels file begins with.

    Only the file's first 18 bytes are read (through gzip when compressed), so
    loading stays fast; a file that cannot be read here is left to ``read_idx``,
    which names its problem.
    """
    labels = found.get("train-labels-idx1-ubyte")
    if labels is None:
        return None
    try:
        with open(labels, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
        with (gzip.open if compressed else open)(labels, "rb") as stream:
            first = stream.read(8 + 10)[8:]
    except (OSError, EOFError, zlib.error):
        return None
    for other, fingerprint in FIRST_TRAIN_LABELS.items():
        if other != name and first == fingerprint:
            return other
    return None


def _stems() -> list[str]:
    return [file_name.removesuffix(".gz") for file_name in IDX_FILES]


def _candidate_dirs(name: str, path: str | os.PathLike[str] | None) -> list[Path]:
    if path is not None:
        # An explicit path is authoritative: finding other data silently would hide a typo.
        return [Path(path).expanduser()]
    dirs: list[Path] = []
    root = os.environ.get("SCRATCHNN_DATA")
    if root:
        # The dataset's own subfolder first: the top folder may hold the other dataset.
        dirs += [Path(root).expanduser() / name, Path(root).expanduser()]
    dirs.append(default_cache_dir(name))
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST_DIR)
    unique: list[Path] = []
    for folder in dirs:
        if folder not in unique:
            unique.append(folder)
    return unique


# MNIST and Fashion-MNIST hold 70,000 examples each (60,000 to train on, 10,000 to test).
MAX_EXAMPLES = 70_000


def _load(
    name: str,
    path: str | os.PathLike[str] | None,
    normalize: bool,
    flatten: bool,
    one_hot_label: bool,
    dtype: DTypeLike,
) -> tuple[Split, Split]:
    who = f"load_{name.replace('-', '_')}"
    # float16/32/64 in the machine's byte order; None is refused, not read as float64.
    float_dtype = _checks.float_dtype(who, dtype).newbyteorder("=")
    normalize = _checks.flag(who, "normalize", normalize)  # "False" would be true
    flatten = _checks.flag(who, "flatten", flatten)
    one_hot_label = _checks.flag(who, "one_hot_label", one_hot_label)
    files = find_dataset_files(name, path)
    splits = []
    for prefix in ("train", "t10k"):
        images_path = files[f"{prefix}-images-idx3-ubyte"]
        labels_path = files[f"{prefix}-labels-idx1-ubyte"]
        # At most the data set's 70,000 examples: a small hostile gzip file could claim and
        # hold gigabytes (of zeros), refused before any is decompressed.
        x = read_idx(images_path, max_bytes=MAX_EXAMPLES * 28 * 28)
        t = read_idx(labels_path, max_bytes=MAX_EXAMPLES)
        _check_split(x, t, images_path, labels_path)
        splits.append(
            (_images(x, normalize, flatten, float_dtype), _labels(t, one_hot_label, float_dtype))
        )
    return splits[0], splits[1]


def _check_split(x: np.ndarray, t: np.ndarray, images_path: Path, labels_path: Path) -> None:
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, 28, 28), "
            f"got {x.dtype} of shape {x.shape}"
        )
    if t.dtype != np.uint8 or t.ndim != 1:
        raise ValueError(
            f"{labels_path}: expected uint8 labels of shape (N,), got {t.dtype} of shape {t.shape}"
        )
    if len(x) != len(t):
        raise ValueError(f"{len(x)} images in {images_path} but {len(t)} labels in {labels_path}")
    if t.size and t.max() > 9:
        raise ValueError(f"{labels_path}: labels must be 0..9, found {int(t.max())}")


def _images(x: np.ndarray, normalize: bool, flatten: bool, dtype: np.dtype[Any]) -> np.ndarray:
    if normalize:
        x = x.astype(dtype)
        x /= 255  # in place: the float copy is the only one made
    return x.reshape(len(x), 784) if flatten else x.reshape(len(x), 1, 28, 28)


def _labels(t: np.ndarray, one_hot: bool, dtype: np.dtype[Any]) -> np.ndarray:
    if not one_hot:
        return t
    one_hot_t = np.zeros((len(t), 10), dtype=dtype)
    one_hot_t[np.arange(len(t)), t] = 1
    return one_hot_t
