"""data/vision.py: every layout is written in a temp dir with a few tiny images and read back."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from data import vision
from engine import UserError
from tests.helpers import SHARED


def _unnormalize(x, mean, std):
    return x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]


def _write_cifar(root, kind, n=4):
    """torchvision's pickled CIFAR batches; image i of a file is filled with the value 10 * i + 1."""
    folder = os.path.join(root, "cifar-10-batches-py" if kind == 10 else "cifar-100-python")
    os.makedirs(folder)
    label_key = "labels" if kind == 10 else "fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if kind == 10 else ["train", "test"]
    for f in files:
        data = np.repeat((np.arange(n, dtype=np.uint8) * 10 + 1)[:, None], 3072, axis=1)
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump({"data": data, label_key: [i % kind for i in range(n)]}, fh)
    meta, key = ("batches.meta", "label_names") if kind == 10 else ("meta", "fine_label_names")
    with open(os.path.join(folder, meta), "wb") as fh:
        pickle.dump({key: [f"c{i}" for i in range(kind)]}, fh)


@pytest.mark.parametrize("kind", [10, 100])
def test_cifar_layout_round_trip(tmp_path, kind):
    _write_cifar(tmp_path, kind)
    name = f"cifar{kind}"
    train = vision.build_dataset(name, tmp_path, "train", 32, aug="none")
    test = vision.build_dataset(name, tmp_path, "test", 32, aug="none")
    assert (len(train), len(test), train.num_classes) == (5 * 4 if kind == 10 else 4, 4, kind)
    x, y = test[3]
    assert x.shape == (3, 32, 32) and y == 3
    pixels = _unnormalize(x, vision.CIFAR_MEAN, vision.CIFAR_STD) * 255
    torch.testing.assert_close(pixels, torch.full_like(pixels, 31.0), atol=1e-3, rtol=0)
    # Resized for finetuning at another size
    assert vision.build_dataset(name, tmp_path, "test", 48, aug="none")[0][0].shape == (3, 48, 48)


def _jpeg(path, color, size=64):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def test_tinyimagenet_layout(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # classes are indexed in sorted order
    os.makedirs(base)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w, color in zip(wnids, [(255, 0, 0), (0, 0, 255)]):
        for i in range(2):
            _jpeg(str(base / "train" / w / "images" / f"{w}_{i}.JPEG"), color)
        (base / "train" / w / f"{w}_boxes.txt").write_text("ignored")
    _jpeg(str(base / "val" / "images" / "val_0.JPEG"), (0, 0, 255))
    _jpeg(str(base / "val" / "images" / "val_1.JPEG"), (255, 0, 0))
    (base / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn01\t0\t0\t8\t8\nval_1.JPEG\tn02\t0\t0\t8\t8\n")
    train = vision.build_dataset("tinyimagenet", tmp_path, "train", 24, aug="basic")
    test = vision.build_dataset("Tiny-ImageNet", tmp_path, "test", 24, aug="none")
    assert (len(train), len(test), train.num_classes) == (4, 2, 2)
    assert sorted(y for _, y in train) == [0, 0, 1, 1]
    x, y = test[0]
    assert x.shape == (3, 24, 24) and y == 0  # n01 -> class 0
    rgb = _unnormalize(x, vision.IMAGENET_MEAN, vision.IMAGENET_STD).mean((1, 2))
    assert rgb[2] > 0.9 and rgb[0] < 0.1  # the blue image


def test_food101_layout(tmp_path):
    base = tmp_path / "food-101"
    classes = {"ramen": (0, 255, 0), "apple_pie": (255, 0, 0)}
    for c, color in classes.items():
        for i in range(3):
            _jpeg(str(base / "images" / c / f"{i}.jpg"), color, size=40)
    os.makedirs(base / "meta")
    (base / "meta" / "train.json").write_text(json.dumps({c: [f"{c}/0", f"{c}/1"] for c in classes}))
    (base / "meta" / "test.json").write_text(json.dumps({c: [f"{c}/2"] for c in classes}))
    train = vision.build_dataset("food101", tmp_path, "train", 32, aug="randaug")
    test = vision.build_dataset("food-101", tmp_path, "test", 32, aug="none")
    assert (len(train), len(test), test.num_classes) == (4, 2, 2)
    assert train[0][0].shape == (3, 32, 32)
    x, y = test[0]  # json order: ramen first
    assert y == 1  # sorted classes: apple_pie 0, ramen 1
    assert _unnormalize(x, vision.IMAGENET_MEAN, vision.IMAGENET_STD).mean((1, 2))[1] > 0.9


def test_imagenet_layout(tmp_path):
    for split in ("train", "val"):
        for c in ("n001", "n002", "n003"):
            _jpeg(str(tmp_path / "imagenet" / split / c / f"{split}.JPEG"), (10, 20, 30), size=20)
    train = vision.build_dataset("imagenet", tmp_path, "train", 16, aug="basic")
    test = vision.build_dataset("imagenet", tmp_path, "test", 16, aug="none")
    assert (len(train), len(test), train.num_classes) == (3, 3, 3)
    assert [y for _, y in test] == [0, 1, 2] and test[0][0].shape == (3, 16, 16)


def test_imagenet_val_uses_the_train_class_index(tmp_path):
    for c in ("n001", "n002", "n003"):
        _jpeg(str(tmp_path / "imagenet" / "train" / c / "a.JPEG"), (10, 20, 30), size=20)
    for c in ("n001", "n003"):  # val/ lacks n002: n003 must stay class 2, not become 1
        _jpeg(str(tmp_path / "imagenet" / "val" / c / "a.JPEG"), (10, 20, 30), size=20)
    test = vision.build_dataset("imagenet", tmp_path, "test", 16, aug="none")
    assert [y for _, y in test.samples] == [0, 2] and test.num_classes == 3
    _jpeg(str(tmp_path / "imagenet" / "val" / "n009" / "a.JPEG"), (10, 20, 30), size=20)
    with pytest.raises(UserError, match="n009 is a class that .*train does not have"):
        vision.build_dataset("imagenet", tmp_path, "test", 16, aug="none")


def test_food101_txt_lists_without_json(tmp_path):
    base = tmp_path / "food-101"
    for c in ("ramen", "apple_pie"):
        for i in range(2):
            _jpeg(str(base / "images" / c / f"{i}.jpg"), (0, 255, 0), size=40)
    os.makedirs(base / "meta")
    (base / "meta" / "classes.txt").write_text("apple_pie\nramen\n")
    (base / "meta" / "train.txt").write_text("ramen/0\napple_pie/0\n")
    (base / "meta" / "test.txt").write_text("ramen/1\napple_pie/1\n")
    train = vision.build_dataset("food101", tmp_path, "train", 32, aug="basic")
    test = vision.build_dataset("food101", tmp_path, "test", 32, aug="none")
    assert (len(train), len(test), test.num_classes) == (2, 2, 2)
    assert [y for _, y in test.samples] == [1, 0] and test[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name, looked_in", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
    ("tinyimagenet", "wnids.txt"), ("food101", "food-101"), ("imagenet", os.path.join("imagenet", "train")),
])
def test_missing_data_names_dataset_path_and_layout(tmp_path, name, looked_in):
    with pytest.raises(UserError) as err:
        vision.build_dataset(name, tmp_path, "train", 32)
    msg = str(err.value)
    assert msg.startswith(f"{name}: no data at {tmp_path}") and looked_in in msg and "expected" in msg
    assert "\n" not in msg


def test_fake_is_deterministic_and_learnable():
    a = vision.build_dataset("fake", "unused", "train", 16, aug="none", num_classes=3, n=60)
    b = vision.build_dataset("fake", "unused", "train", 16, aug="none", num_classes=3, n=60)
    test = vision.build_dataset("fake", "unused", "test", 16, aug="none", num_classes=3, n=60)
    assert (len(a), len(test), a.num_classes) == (60, 12, 3)
    torch.testing.assert_close(a[7][0], b[7][0], rtol=0, atol=0)
    assert a[7][1] == b[7][1] and not torch.equal(a[7][0], a[8][0])
    xs, ys = zip(*(a[i] for i in range(60)))
    xs, ys = torch.stack(xs), torch.tensor(ys)
    assert set(ys.tolist()) == {0, 1, 2}
    # Nearest class mean classifies held-out images well above chance (1/3): the classes are learnable.
    means = torch.stack([xs[ys == c].mean(0) for c in range(3)]).flatten(1)
    tx, ty = zip(*(test[i] for i in range(len(test))))
    pred = torch.cdist(torch.stack(tx).flatten(1), means).argmin(1)
    assert (pred == torch.tensor(ty)).float().mean() > 0.8


def test_digits_is_sklearns_real_digits_upscaled_with_a_fixed_split():
    from sklearn.datasets import load_digits

    train = vision.build_dataset("digits", "unused", "train", 32, aug="none")
    test = vision.build_dataset("digits", "unused", "test", 32, aug="none")
    assert (len(train), len(test), train.num_classes, vision.default_size("digits")) == (1437, 360, 10, 32)
    x, y = test[0]
    bunch = load_digits()
    assert x.shape == (3, 32, 32) and y == bunch.target[1437]
    # Undo the 4x (bilinear) upscale: the 8x8 image is sklearn's, up to the blur.
    pixels = torch.nn.functional.avg_pool2d(x[:1][None], 4).flatten()
    assert torch.corrcoef(torch.stack([pixels, torch.tensor(bunch.images[1437]).flatten().float()]))[0, 1] > 0.95
    # Training augmentation shifts but never mirrors: every draw equals a shifted, unflipped crop.
    aug = vision.build_dataset("digits", "unused", "train", 8, aug="basic")
    plain = vision.build_dataset("digits", "unused", "train", 8, aug="none")[3][0]
    padded = torch.nn.functional.pad(plain, (1, 1, 1, 1), value=float(-0.305 / 0.376))
    shifts = {(i, j): padded[:, i:i + 8, j:j + 8] for i in range(3) for j in range(3)}
    for seed in range(8):
        torch.manual_seed(seed)
        got = aug[3][0]
        assert any(torch.allclose(got, s, atol=1e-5) for s in shifts.values())


def test_augmentation_follows_the_global_seed():
    ds = vision.build_dataset("fake", "unused", "train", 32, aug="randaug", n=10)
    torch.manual_seed(5)
    first = ds[0][0]
    torch.manual_seed(5)
    torch.testing.assert_close(ds[0][0], first, rtol=0, atol=0)
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        outs.append(ds[0][0])
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # the crops / flips / ops do vary


def test_bad_names():
    with pytest.raises(UserError, match="unknown dataset 'mnist'; choose from: cifar10, cifar100"):
        vision.build_dataset("mnist", "x", "train", 32)
    with pytest.raises(UserError, match="unknown aug"):
        vision.build_dataset("fake", "x", "train", 32, aug="mixup")


def _write_idx(path, array, gz=True):
    import gzip

    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fashion_files(root, n_train=12, n_test=5, gz=True):
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        suffix = ".gz" if gz else ""
        _write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte{suffix}"), images, gz)
        _write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte{suffix}"), labels, gz)
        data[prefix] = images, labels
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_fashionmnist_reads_torchvisions_raw_idx_files(tmp_path, gz):
    data = _fashion_files(str(tmp_path), gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = vision.build_dataset("fashion-mnist", str(tmp_path), split, 28, aug="none")
        images, labels = data[prefix]
        assert len(ds) == len(labels) and ds.num_classes == 10
        x, y = ds[3]
        assert y == labels[3] and x.shape == (3, 28, 28)
        grey = _unnormalize(x, (0.2860,) * 3, (0.3530,) * 3)
        torch.testing.assert_close(grey, torch.from_numpy(images[3] / 255.0).float().expand(3, 28, 28), atol=1e-5, rtol=0)
    assert vision.build_dataset("fashionmnist", str(tmp_path), "train", 32, aug="basic")[0][0].shape == (3, 32, 32)


def test_fashionmnist_missing_or_truncated_files_are_one_line(tmp_path):
    with pytest.raises(UserError, match="fashionmnist: no data at .*FashionMNIST/raw/train-images-idx3-ubyte.gz"):
        vision.build_dataset("fashionmnist", str(tmp_path), "train", 28)
    _fashion_files(str(tmp_path))
    path = os.path.join(str(tmp_path), "FashionMNIST", "raw", "t10k-images-idx3-ubyte.gz")
    with open(path, "rb") as f:
        head = f.read()[:-20]
    with open(path, "wb") as f:
        f.write(head)
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz: unreadable idx file .*truncated"):
        vision.build_dataset("fashionmnist", str(tmp_path), "test", 28)


SHARED_FASHION = os.path.join(SHARED, "vision")


@pytest.mark.real_data
def test_fashionmnist_from_the_shared_data():
    if not os.path.isdir(os.path.join(SHARED_FASHION, "FashionMNIST", "raw")):
        pytest.skip("../shared/data/vision/FashionMNIST absent: Fashion-MNIST is not in this checkout's shared data")
    train = vision.build_dataset("fashionmnist", SHARED_FASHION, "train", 28, aug="none")
    test = vision.build_dataset("fashionmnist", SHARED_FASHION, "test", 28, aug="none")
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert int(train.labels[0]) == 9 and train.classes[9] == "Ankle boot"  # the data set's first image
    pixels = train.images.float() / 255
    assert (round(pixels.mean().item(), 4), round(pixels.std().item(), 4)) == (0.2860, 0.3530)
