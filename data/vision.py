"""Image classification data sets of the paper, by `--dataset` name, in their usual on-disk layouts.

`build_dataset(name, root, split, size, aug)` returns a torch `Dataset` of (float image tensor
(3, size, size), int label); `split` is "train" or "test" (the validation set where a data set has
no public test labels). The built dataset has `num_classes`. Layouts under `root` (`--data-dir`):

- cifar10 / cifar100: torchvision's `cifar-10-batches-py/` / `cifar-100-python/` (what
  `download=True` extracts); downloaded only when `download=True`.
- tinyimagenet: `tiny-imagenet-200/` with `wnids.txt`, `train/<wnid>/images/*.JPEG`,
  `val/images/*.JPEG` and `val/val_annotations.txt` (file<TAB>wnid<TAB>...).
- food101: torchvision's `food-101/` with `meta/{train,test}.json` and `images/<class>/<id>.jpg`, or
  the original archive's `meta/{train,test,classes}.txt` lists (one `<class>/<id>` per line).
- imagenet: `imagenet/train/<wnid>/*.JPEG` and `imagenet/val/<wnid>/*.JPEG` (ImageFolder layout). Both
  splits use the train split's class index, so a val/ missing a class keeps every other label; a val/
  class that train/ lacks is an error.
- fake: generated on the fly (no files), any size and class count, learnable (each class is a
  fixed low-frequency pattern plus noise); for offline smoke runs and benchmarks.
- fashionmnist: Zalando's Fashion-MNIST (60,000 train / 10,000 test 28x28 grey images, 10 classes) in
  torchvision's layout `FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` (what
  `download=True` fetches); the gzip files are read as they are, so a read-only copy works. Grey
  repeated on 3 channels, upscaled to `size` (32).
- digits: scikit-learn's embedded 8x8 handwritten digits (1797 real images, 10 classes; no files, no
  download), upscaled (bilinear) to `size` (32), grey repeated on 3 channels; a fixed split: the first
  1437 images train, the last 360 test. Its augmentation never flips (a flipped 2 is not a 2).

Missing files raise `engine.UserError` naming the data set, the path looked in and the layout.

Augmentation (`aug`): "none"; "basic" = the authors' CIFAR recipe for small images (random crop
with 1/8 padding + horizontal flip, then resize to `size`), RandomResizedCrop + flip for
Food-101/ImageNet; "randaug" = basic + RandAugment(N=2, M=14) first, as in the authors' script.
Random transforms draw from torch's global RNG; train.py seeds it per (epoch, sample) so runs
are reproducible whatever the number of workers or processes.
"""
import math
import os
import pickle
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
from torchvision.transforms import v2

from engine.errors import UserError

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the authors' values
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
AUGS = ("none", "basic", "randaug")


def _missing(name, path, layout):
    return UserError(f"{name}: no data at {path}; expected {layout} under --data-dir "
                     "(default: $RLO_DATA_DIR, else ./datasets)")


def _transform(split, size, aug, native, mean, std, flip=True):
    """native: the stored image size for small-image sets (crop-pad recipe), None for large ones."""
    ops = [v2.ToImage()]
    train = split == "train" and aug != "none"
    if train and aug == "randaug":
        ops.append(v2.RandAugment(num_ops=2, magnitude=14))
    if native is not None:
        if train:
            ops.append(v2.RandomCrop(native, padding=max(1, native // 8)))
            if flip:
                ops.append(v2.RandomHorizontalFlip())
        if size != native:
            ops.append(v2.Resize(size, antialias=True))
    elif train:
        ops += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        ops += [v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


class _PresenceCheckedCIFAR:
    """torchvision CIFAR that checks the files are there instead of their md5 sums, so subsets and
    re-packed copies load; `download=True` still verifies the downloaded archive."""

    def _check_integrity(self):
        root = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(root, f)) for f, _ in self.train_list + self.test_list)

    def _load_meta(self):
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10(_PresenceCheckedCIFAR, tvd.CIFAR10):
    pass


class CIFAR100(_PresenceCheckedCIFAR, tvd.CIFAR100):
    pass


def _cifar(cls, name):
    def build(root, split, transform, download=False, **_):
        path = os.path.join(root, cls.base_folder)
        if not download and not os.path.isdir(path):
            files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
            raise _missing(name, path, f"torchvision's layout ({', '.join(files)}); "
                                       "pass --download to fetch it")
        try:
            ds = cls(root, train=split == "train", transform=transform, download=download)
        except (RuntimeError, OSError) as err:
            raise _missing(name, path, f"torchvision's layout ({err})") from None
        ds.num_classes = len(ds.classes)
        return ds

    return build


class ImageList(Dataset):
    """(path, label) pairs read with PIL."""

    def __init__(self, samples, classes, transform):
        self.samples, self.classes, self.transform = samples, classes, transform
        self.num_classes = len(classes)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(default_loader(path)), label


def _tinyimagenet(root, split, transform, **_):
    base = os.path.join(root, "tiny-imagenet-200")
    layout = ("tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
              "val/val_annotations.txt}")
    wnids_file = os.path.join(base, "wnids.txt")
    if not os.path.isfile(wnids_file):
        raise _missing("tinyimagenet", wnids_file, layout)
    with open(wnids_file) as f:
        classes = sorted(line.strip() for line in f if line.strip())
    index = {w: i for i, w in enumerate(classes)}
    samples = []
    if split == "train":
        for w in classes:
            folder = os.path.join(base, "train", w, "images")
            if not os.path.isdir(folder):
                raise _missing("tinyimagenet", folder, layout)
            samples += [(os.path.join(folder, f), index[w]) for f in sorted(os.listdir(folder))
                        if f.lower().endswith((".jpeg", ".jpg", ".png"))]
    else:
        ann = os.path.join(base, "val", "val_annotations.txt")
        if not os.path.isfile(ann):
            raise _missing("tinyimagenet", ann, layout)
        with open(ann) as f:
            rows = [(i, line.strip().split("\t")) for i, line in enumerate(f, 1) if line.strip()]
        for lineno, cells in rows:
            if len(cells) < 2 or cells[1] not in index:  # a bad line: one message, not a KeyError
                raise UserError(f"{ann}:{lineno}: expected file<TAB>wnid of wnids.txt, got {cells[:2]}")
            samples.append((os.path.join(base, "val", "images", cells[0]), index[cells[1]]))
    if not samples:
        raise _missing("tinyimagenet", base, layout + " (found no images)")
    return ImageList(samples, classes, transform)


def _food101(root, split, transform, download=False, **_):
    base = os.path.join(root, "food-101")
    meta = os.path.join(base, "meta")
    if download or os.path.isfile(os.path.join(meta, f"{split}.json")):
        ds = tvd.Food101(root, split=split, transform=transform, download=download)
        ds.num_classes = len(ds.classes)
        return ds
    lists = [os.path.join(meta, f) for f in (f"{split}.txt", "classes.txt")]
    if not all(os.path.isfile(f) for f in lists):
        raise _missing("food101", base, "torchvision's food-101/{meta/train.json, meta/test.json, "
                                        "images/<class>/<id>.jpg} or meta/{train,test,classes}.txt; "
                                        "pass --download to fetch it")
    with open(lists[1]) as f:
        classes = sorted(line.strip() for line in f if line.strip())  # as torchvision: sorted names
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    with open(lists[0]) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                cls = line.strip().split("/")[0]
                if cls not in index:
                    raise UserError(f"{lists[0]}:{lineno}: class {cls!r} is not in classes.txt")
                samples.append((os.path.join(base, "images", line.strip() + ".jpg"), index[cls]))
    return ImageList(samples, classes, transform)


def _image_files(folder):
    return [os.path.join(d, f) for d, _, files in sorted(os.walk(folder)) for f in sorted(files)
            if f.lower().endswith(IMG_EXTENSIONS)]


def _imagenet(root, split, transform, **_):
    base = os.path.join(root, "imagenet")
    layout = "ImageFolder layout imagenet/{train,val}/<wnid>/*.JPEG (val sorted into class folders)"
    train = os.path.join(base, "train")
    folder = train if split == "train" else os.path.join(base, "val")
    for path in (train, folder):
        if not os.path.isdir(path):
            raise _missing("imagenet", path, layout)
    # The train split's classes index both splits: ImageFolder indexing val/ on its own would shift
    # every label after a class that val/ lacks.
    classes = sorted(e.name for e in os.scandir(train) if e.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in sorted(e.name for e in os.scandir(folder) if e.is_dir()):
        if c not in index:
            raise UserError(f"imagenet: {os.path.join(folder, c)} is a class that {train} does not have")
        samples += [(path, index[c]) for path in _image_files(os.path.join(folder, c))]
    if not samples:
        raise _missing("imagenet", folder, layout + " (found no images)")
    return ImageList(samples, classes, transform)


class FakeImages(Dataset):
    """Deterministic generated images: sample i of a split is always the same image and label."""

    def __init__(self, n, size, num_classes, transform, seed):
        self.n, self.size, self.num_classes, self.transform, self.seed = n, size, num_classes, transform, seed
        g = torch.Generator().manual_seed(1234)  # class patterns shared by every split
        coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
        self.patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                                        align_corners=False)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(self.num_classes, (), generator=g))
        noise = torch.randn(3, self.size, self.size, generator=g)
        img = (128 + 40 * self.patterns[label] + 40 * noise).clamp(0, 255).to(torch.uint8)
        return self.transform(img), label


def _fake(root, split, transform, size=32, num_classes=10, n=None, **_):
    n_train = 5000 if n is None else n
    return FakeImages(n_train if split == "train" else max(1, n_train // 5), size, num_classes, transform,
                      seed=1 if split == "train" else 2)


class GreyImages(Dataset):
    """uint8 grey images (n, h, w) and their labels, each image served on 3 channels (Fashion-MNIST, digits)."""

    def __init__(self, images, labels, classes, transform):
        self.images, self.labels, self.classes = images, labels, classes
        self.transform, self.num_classes = transform, len(classes)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        return self.transform(image.expand(3, *image.shape)), int(self.labels[i])


def read_idx(path):
    """An idx file (LeCun's format: magic with the dtype code and rank, big-endian sizes, then the data),
    plain or gzipped, as a uint8 tensor."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        magic = int.from_bytes(data[:4], "big")
        rank = magic & 0xFF
        shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
        body = data[4 + 4 * rank:]
        if magic >> 8 != 0x08 or len(body) != math.prod(shape):
            raise ValueError(f"not a uint8 idx file of shape {shape} ({len(body)} data bytes)")
    except (OSError, EOFError, ValueError) as err:
        raise UserError(f"{path}: unreadable idx file ({err}); is it truncated?") from None
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def _fashionmnist(root, split, transform, download=False, **_):
    if download:  # torchvision fetches and checks the md5 sums; its files are then read as below
        tvd.FashionMNIST(root, train=split == "train", download=True)
    raw = os.path.join(root, "FashionMNIST", "raw")
    prefix = "train" if split == "train" else "t10k"
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte"
        found = [p for p in (os.path.join(raw, name), os.path.join(raw, name + ".gz")) if os.path.isfile(p)]
        if not found:
            raise _missing("fashionmnist", os.path.join(raw, name + ".gz"),
                           "torchvision's FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz "
                           "(e.g. --data-dir ../shared/data/vision); pass --download to fetch it")
        paths.append(found[0])
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dim() != 3 or labels.shape != images.shape[:1] or int(labels.max()) >= len(FASHION_CLASSES):
        raise UserError(f"fashionmnist: {paths[0]} and {paths[1]} do not match ({tuple(images.shape)} images, "
                        f"{tuple(labels.shape)} labels, largest label {int(labels.max())})")
    return GreyImages(images, labels, FASHION_CLASSES, transform)


DIGITS_TEST = 360  # the last 360 of scikit-learn's 1797 digits (about 36 per class) are the test split


def _digits(root, split, transform, **_):
    """scikit-learn's 8x8 digits, 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images * (255 / 16)).round().to(torch.uint8)
    labels = torch.from_numpy(bunch.target)
    part = slice(None, -DIGITS_TEST) if split == "train" else slice(-DIGITS_TEST, None)
    return GreyImages(images[part], labels[part], tuple(str(d) for d in range(10)), transform)


@dataclass(frozen=True)
class VisionSet:
    """A --dataset: its builder (root, split, transform, ...) -> Dataset and how its images are prepared."""
    build: Callable
    mean: tuple
    std: tuple
    default_size: int
    native: int = None  # stored size of a small-image set (crop-pad recipe); None: large images
    native_is_size: bool = False  # generated at the requested size (crop-pad recipe at that size)
    flip: bool = True  # random horizontal flips in the train augmentation (not for digits: a flipped 2 is no 2)


DATASETS = {
    "cifar10": VisionSet(_cifar(CIFAR10, "cifar10"), CIFAR_MEAN, CIFAR_STD, 32, native=32),
    "cifar100": VisionSet(_cifar(CIFAR100, "cifar100"), CIFAR_MEAN, CIFAR_STD, 32, native=32),
    "tinyimagenet": VisionSet(_tinyimagenet, IMAGENET_MEAN, IMAGENET_STD, 224, native=64),
    "food101": VisionSet(_food101, IMAGENET_MEAN, IMAGENET_STD, 224),
    "imagenet": VisionSet(_imagenet, IMAGENET_MEAN, IMAGENET_STD, 224),
    "fake": VisionSet(_fake, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, native_is_size=True),
    # pixel mean / std of the 60,000 training images
    "fashionmnist": VisionSet(_fashionmnist, (0.2860,) * 3, (0.3530,) * 3, 32, native=28),
    # pixel mean / std of the 1797 images
    "digits": VisionSet(_digits, (0.305,) * 3, (0.376,) * 3, 32, native=8, flip=False),
}
ALIASES = {"tiny-imagenet": "tinyimagenet", "food-101": "food101", "imagenet1k": "imagenet",
           "fashion-mnist": "fashionmnist", "fmnist": "fashionmnist"}


def canonical_name(name):
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")
    return key


def default_size(name):
    return DATASETS[canonical_name(name)].default_size


def build_dataset(name, root, split, size, aug="basic", download=False, mean=None, std=None,
                  num_classes=10, n=None):
    """`num_classes` and `n` (training images; the test split gets n // 5) apply to `fake` only;
    `mean`/`std` override the data set's normalization (e.g. a pretrained model's)."""
    key = canonical_name(name)
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', got {split!r}")
    if aug not in AUGS:
        raise UserError(f"unknown aug {aug!r}; choose from: {', '.join(AUGS)}")
    if size < 1:
        raise UserError(f"--size must be positive, got {size}")
    entry = DATASETS[key]
    native = size if entry.native_is_size else entry.native
    transform = _transform(split, size, aug, native, mean or entry.mean, std or entry.std, flip=entry.flip)
    return entry.build(os.path.expanduser(root), split, transform, download=download, size=size,
                   num_classes=num_classes, n=n)
