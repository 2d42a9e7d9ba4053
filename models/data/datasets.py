"""Data sets as decoded, in-memory uint8 tensors (decode once; epochs after the first do no
JPEG work), from four layouts:

- an ImageFolder directory (``root/<class>/<image>``, or ``root/<split>/<class>/<image>``),
- a tar of one (like ``cifar10-jpeg/test.tar`` holding ``test/<class>/NNNN.jpg``),
- a MedMNIST ``.npz`` (``{split}_images``, ``{split}_labels``),
- a torchvision CIFAR-10 root (``cifar-10-batches-py``; downloaded with ``download=True``).

Files are ordered by their path (plain string sort) and classes by sorted folder name, so a
seeded subset (``models.data.splits``) names the same images in every program.
Decoded sets are cached on disk (``AEX_CACHE_DIR``, default ``~/.cache/aex``) keyed by the
source's path, size and mtime."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.data.imaging import prepare_array
from models.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


MEDMNIST_CLASSES = {"pneumoniamnist": ["normal", "pneumonia"]}


SPLITS = ("train", "val", "test")


@dataclass
class ImageSet:
    """images: uint8 N x C x H x W in [0, 255]; labels: int64 N; classes: names by index."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str
    kind: str  # augmentation recipe name (see preprocess.AUGMENTATIONS)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def input_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    def subset(self, idx: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[idx], self.labels[idx], self.classes, self.source, self.kind)

    def float_batch(self, idx: torch.Tensor | slice) -> torch.Tensor:
        """float32 batch N x C x H x W in [0, 1]."""
        return self.images[idx].float().div_(255.0)


def _to_uint8_chw(arr: np.ndarray) -> np.ndarray:
    return (np.clip(arr, 0, 1) * 255.0 + 0.5).astype(np.uint8).transpose(2, 0, 1)


def _decode(data: bytes, input_size: int | None, in_channels: int | None, name: str) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # a data set with a broken file: say which one
        raise DataError(f"cannot decode {name}: {exc}") from None
    size = input_size or max(img.size)
    channels = in_channels or (1 if img.mode in ("L", "I;16", "I", "F", "1") else 3)
    if input_size is None and img.size[0] != img.size[1]:
        raise DataError(f"{name} is not square; pass an input size to resize the data set")
    return _to_uint8_chw(prepare_array(img, size, channels))


def _folder_items(paths: list[str]) -> tuple[list[str], list[str], list[int]]:
    """Split ``<class>/<file>`` relative paths into classes (sorted) and labels."""
    paths = sorted(p for p in paths if p.lower().endswith(IMAGE_SUFFIXES) and p.count("/") >= 1)
    classes = sorted({p.split("/")[-2] for p in paths})
    index = {c: i for i, c in enumerate(classes)}
    return paths, classes, [index[p.split("/")[-2]] for p in paths]


def _pick_split_prefix(names: list[str], split: str) -> str:
    """Return the prefix (``''``, ``'test/'``, ``'x/test/'`` ...) of the ImageFolder inside."""
    tops = {n.split("/")[0] for n in names if "/" in n}
    if split in tops:
        return f"{split}/"
    if len(tops) == 1:
        top = next(iter(tops))
        subs = {n.split("/")[1] for n in names if n.count("/") >= 2 and n.startswith(top + "/")}
        if split in subs:
            return f"{top}/{split}/"
        if all(n.count("/") == 2 for n in names if n.lower().endswith(IMAGE_SUFFIXES)):
            return f"{top}/"
    return ""


def _load_tar(path: Path, split: str, input_size, in_channels) -> tuple[np.ndarray, list[int], list[str]]:
    try:
        tf = tarfile.open(path)  # noqa: SIM115 - closed by the `with tf` below, once it opened
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{path}: not a readable tar file ({exc})") from None
    with tf:
        members = {m.name.lstrip("./"): m for m in tf.getmembers() if m.isfile()}
        prefix = _pick_split_prefix(list(members), split)
        rel = [n[len(prefix) :] for n in members if n.startswith(prefix)]
        files, classes, labels = _folder_items([r for r in rel if r.count("/") == 1])
        if not files:
            raise DataError(f"{path}: no <class>/<image> files found (split {split!r})")
        arrays = [_decode(tf.extractfile(members[prefix + f]).read(), input_size, in_channels, f) for f in files]
    return np.stack(arrays), labels, classes


def _load_folder(path: Path, split: str, input_size, in_channels) -> tuple[np.ndarray, list[int], list[str]]:
    root = path / split if (path / split).is_dir() else path
    rel = [str(p.relative_to(root)).replace(os.sep, "/") for p in root.glob("*/*") if p.is_file()]
    files, classes, labels = _folder_items(rel)
    if not files:
        raise DataError(f"{root}: no <class>/<image> files found")
    arrays = [_decode((root / f).read_bytes(), input_size, in_channels, f) for f in files]
    return np.stack(arrays), labels, classes


def _load_npz(path: Path, split: str) -> tuple[np.ndarray, list[int], list[str]]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    key = f"{split}_images"
    if key not in npz.files:
        raise DataError(f"{path}: no array {key!r} (has {', '.join(npz.files)})")
    images = npz[key]
    labels = npz[f"{split}_labels"].reshape(-1).astype(np.int64)
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    n_classes = int(labels.max()) + 1
    classes = MEDMNIST_CLASSES.get(path.stem, [str(i) for i in range(n_classes)])
    return np.ascontiguousarray(images.astype(np.uint8)), labels.tolist(), classes


def _load_torchvision_cifar(path: Path, split: str, download: bool):
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(path), train=(split == "train"), download=download)
    except RuntimeError as exc:
        raise DataError(f"{path}: {exc}") from None
    return np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), list(ds.targets), list(ds.classes)


def _cache_file(path: Path, split: str, input_size, in_channels) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{split}|{input_size}|{in_channels}|v1"
    base = Path(os.environ.get("AEX_CACHE_DIR", Path.home() / ".cache" / "aex"))
    return base / "datasets" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")


def _guess_kind(classes: list[str], in_channels: int, spec: str) -> str:
    if classes == CIFAR10_CLASSES:
        return "cifar10"
    if in_channels == 1 or "mnist" in spec.lower():
        return "medical"
    return "natural"


def load_dataset(
    spec: str | os.PathLike,
    split: str = "test",
    input_size: int | None = None,
    in_channels: int | None = None,
    download: bool = False,
    use_cache: bool = True,
) -> ImageSet:
    """Load split ``split`` of the data set at ``spec`` into memory (see module docstring).

    ``input_size``/``in_channels`` resize and convert images (needed for folders of
    differently sized images); None keeps them as stored.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(spec)
    is_cifar_root = (path / "cifar-10-batches-py").is_dir() or path.name == "cifar-10-batches-py"
    if not path.exists() and not download:
        raise DataError(f"data set not found: {path}")
    if download or is_cifar_root:
        root = path.parent if path.name == "cifar-10-batches-py" else path
        images, labels, classes = _load_torchvision_cifar(root, split, download)
    elif path.suffix == ".npz":
        images, labels, classes = _load_npz(path, split)
    else:
        cache = _cache_file(path, split, input_size, in_channels) if use_cache else None
        if cache is not None and cache.is_file():
            with np.load(cache, allow_pickle=False) as z:
                images, labels, classes = z["images"], z["labels"].tolist(), z["classes"].tolist()
        else:
            if path.is_file() and tarfile.is_tarfile(path):
                images, labels, classes = _load_tar(path, split, input_size, in_channels)
            elif path.is_dir():
                images, labels, classes = _load_folder(path, split, input_size, in_channels)
            else:
                raise DataError(f"{path}: not an ImageFolder directory, tar, .npz or CIFAR-10 root")
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp.npz")
                np.savez(tmp, images=images, labels=np.asarray(labels), classes=np.asarray(classes))
                os.replace(tmp, cache)
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if (
        input_size is not None
        and tensor.shape[-1] != input_size
        or (in_channels is not None and tensor.shape[1] != in_channels)
    ):
        tensor = _resize_tensor(tensor, input_size or tensor.shape[-1], in_channels or tensor.shape[1])
    kind = _guess_kind(list(classes), tensor.shape[1], str(spec))
    return ImageSet(tensor, torch.as_tensor(labels, dtype=torch.int64), list(classes), str(spec), kind)


def _resize_tensor(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Bring array-backed sets (.npz, CIFAR root) to the model's size and channels."""
    out = []
    for img in images.numpy():
        arr = img.transpose(1, 2, 0).astype(np.float32) / 255.0
        pil = (
            Image.fromarray((arr[..., 0] * 255).astype(np.uint8))
            if arr.shape[-1] == 1
            else Image.fromarray((arr * 255).astype(np.uint8))
        )
        out.append(_to_uint8_chw(prepare_array(pil, size, channels)))
    return torch.from_numpy(np.stack(out))
