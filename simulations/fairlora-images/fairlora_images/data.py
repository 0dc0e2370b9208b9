"""Sites whose labelling rule depends on a group the pixels do not show.

Every image carries a group id (0 = group A, 1 = group B) drawn at random with the
site's own group mix, independently of the image: like a patient's sex recorded next to
a scan, the site knows it, the pixels do not tell it. The binary label of an image of
class ``c`` is ``c in GROUP_RULES[group]`` (:mod:`fedlowrank.datasets.fashion_mnist`, shared
with benchmarks/experiment.py):

- group A (upper body): T-shirt/top, Pullover, Coat, Shirt are positive;
- group B (outerwear or footwear): Pullover, Coat, Sandal, Sneaker, Ankle boot are positive.

The groups agree on five classes (Pullover and Coat positive; Trouser, Dress and Bag
negative) and disagree on the other five (T-shirt/top and Shirt: A only; Sandal, Sneaker
and Ankle boot: B only). A model that cannot route by group (one row of singular values,
G = 1) must compromise on the disputed classes; FairLoRA (G = 2, a row of S per group)
can follow both rules.

Datasets (run or node config ``dataset``):

- ``fashion-mnist`` (default): Debian's ``dataset-fashion-mnist`` files. The first
  :data:`PRETRAIN_IMAGES` images of a fixed permutation of the train set pretrained the
  base (prepare.py) and are given to no site; sites draw their training images from the
  rest and their test images from the official test set.
- ``digits``: scikit-learn's 8x8 digits, the small fallback where Fashion-MNIST is not
  installed; the same class-index rules (digits 0, 2, 4, 6 for A, ...), no held-out slice.
- ``medmnist``: each site's own MedMNIST-style ``.npz`` (node config ``data-path``):
  its ``train``/``test`` splits with binary labels as stored, and group ids from the
  optional arrays ``train_groups``/``test_groups`` (-1 = unknown where absent). No
  relabelling: a real medical task brings its own labels.

All images go through the same MONAI preprocessing as pretraining (:func:`preprocess`).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedlowrank.datasets import ImageSet, load_digits_images, load_fashion_mnist, load_medmnist
from fedlowrank.datasets.fashion_mnist import DEFAULT_ROOT, GROUP_NAMES
from fedlowrank.datasets.fashion_mnist import relabel_by_group as relabel

from .model import IMAGE_SIZE

DATASETS = ("fashion-mnist", "digits", "medmnist")
PRETRAIN_IMAGES = 10_000
PRETRAIN_SEED = 0  # fixed: the shipped base was trained on this slice, whatever a run's seed
TEST_FRACTION = 0.25  # a site's test images per training image
SOURCE_SIZE = 28  # images are brought to 28x28, then padded to IMAGE_SIZE


def group_share(partition: int, num_partitions: int) -> float:
    """Share of group B at a site: 0.1 at site 0 rising evenly to 0.5 at the last site.

    Group B is the minority overall (30% with evenly sized sites) and the sites differ
    in mix, as hospitals differ in their patients.
    """
    if num_partitions == 1:
        return 0.3
    return 0.1 + 0.4 * partition / (num_partitions - 1)


def assign_groups(n: int, share: float, seed) -> np.ndarray:
    """``n`` group ids, each 1 with probability ``share``, independent of the images."""
    return (np.random.default_rng(seed).random(n) < share).astype(np.int64)


def check_dataset(dataset: str) -> str:
    """``dataset`` if it is one of :data:`DATASETS`, else a ValueError naming the choices."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset {dataset!r} is not one of {DATASETS}")
    return dataset


@lru_cache(maxsize=2)
def source_images(dataset: str, root: str = DEFAULT_ROOT) -> tuple[ImageSet, ImageSet]:
    """The sites' pool of 10-class images: ``(train pool, test pool)``.

    Fashion-MNIST: the train set without the pretraining slice, and the test set.
    Digits: a fixed 80/20 split of the 1,797 images.
    """
    if check_dataset(dataset) == "fashion-mnist":
        train = load_fashion_mnist(root, "train")
        rest = np.sort(pretrain_split(len(train))[1])
        return subset(train, rest), load_fashion_mnist(root, "test")
    if dataset == "digits":
        digits = load_digits_images()
        order = np.random.default_rng(PRETRAIN_SEED).permutation(len(digits))
        cut = int(round(len(digits) * 0.8))
        return subset(digits, np.sort(order[:cut])), subset(digits, np.sort(order[cut:]))
    raise ValueError(f"dataset {dataset!r} has no shared pool: each site reads its own file (node config data-path)")


def pretrain_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the Fashion-MNIST train set: ``(pretraining slice, the sites' pool)``."""
    order = np.random.default_rng(PRETRAIN_SEED).permutation(n)
    return order[:PRETRAIN_IMAGES], order[PRETRAIN_IMAGES:]


def subset(images: ImageSet, rows: np.ndarray) -> ImageSet:
    """The given rows of an ImageSet."""
    return ImageSet(images.images[rows], images.labels[rows], images.groups[rows], images.group_names)


def site_indices(pool_size: int, partition: int, num_partitions: int, per_site: int, seed: int) -> np.ndarray:
    """Rows of a pool that one site holds: ``per_site`` of them (fewer if the pool is short).

    Sites get disjoint, equally sized random draws; every node computes the same split
    from the seed. ``per_site`` = 0 gives each site an equal share of the whole pool.
    """
    if not 0 <= partition < num_partitions:
        raise ValueError(f"partition-id {partition} must be in 0..{num_partitions - 1}")
    share = pool_size // num_partitions
    n = share if per_site <= 0 else min(per_site, share)
    if n == 0:
        raise ValueError(f"{pool_size} images cannot be split over {num_partitions} sites")
    order = np.random.default_rng(seed).permutation(pool_size)
    return np.sort(order[partition * n : (partition + 1) * n])


@lru_cache(maxsize=64)
def site_task(
    dataset: str, partition: int, num_partitions: int, per_site: int, seed: int, root: str = DEFAULT_ROOT
) -> tuple[ImageSet, ImageSet, np.ndarray, np.ndarray]:
    """One simulated site: ``(train, test, train classes, test classes)``.

    The ImageSets hold the site's images (as loaded, not yet preprocessed), binary labels
    by :data:`RULES` and group ids drawn with the site's :func:`group_share`; the classes
    are the 10-class labels the binary ones came from. ``per_site`` training images
    (0 = an equal share of the pool) and a quarter as many test images.
    """
    train_pool, test_pool = source_images(dataset, root)
    share = group_share(partition, num_partitions)
    per_test = 0 if per_site <= 0 else max(1, int(round(per_site * TEST_FRACTION)))
    parts = []
    for pool, n, salt in ((train_pool, per_site, 1), (test_pool, per_test, 2)):
        rows = site_indices(len(pool), partition, num_partitions, n, seed + salt)
        classes = pool.labels[rows]
        groups = assign_groups(len(rows), share, [seed, partition, salt])
        parts.append((ImageSet(pool.images[rows], relabel(classes, groups), groups, GROUP_NAMES), classes))
    (train, train_classes), (test, test_classes) = parts
    return train, test, train_classes, test_classes


def load_site_file(path: str | os.PathLike) -> tuple[ImageSet, ImageSet]:
    """A site's own MedMNIST-style ``.npz``: ``(train, test)`` with binary labels.

    Group ids come from the optional keys ``train_groups`` and ``test_groups`` (ints,
    -1 = unknown); without them every group is unknown and FairLoRA routes the site's
    images through the group-share-weighted singular values.

    Raises
    ------
    FileNotFoundError
        Naming the path (node config ``data-path``).
    ValueError
        If the labels are not binary 0/1 or the images are not grey 2-D (this base
        network takes one channel), naming what was found.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"site data file {path} does not exist (node config data-path)")
    with np.load(path, allow_pickle=False) as npz:
        stored = {key: npz[key] for key in ("train_groups", "test_groups") if key in npz.files}
    out = []
    for split in ("train", "test"):
        data = load_medmnist(path, split, groups=stored.get(f"{split}_groups"), group_names=GROUP_NAMES if stored else ())
        if data.labels.ndim != 1 or not np.isin(data.labels, (0, 1)).all():
            found = sorted(set(np.unique(data.labels).tolist()))[:10] if data.labels.ndim == 1 else f"shape {data.labels.shape}"
            raise ValueError(f"{path} [{split}_labels]: this app's head is binary, labels must be 0/1; got {found}")
        if data.images.ndim != 4 or data.images.shape[1] != 1:
            raise ValueError(f"{path} [{split}_images]: the base takes grey 2-D images (N, 1, H, W), got {data.images.shape}")
        out.append(data)
    return out[0], out[1]


def preprocess(images: np.ndarray) -> torch.Tensor:
    """MONAI preprocessing shared by pretraining and fine-tuning: (N, 1, H, W) -> (N, 1, 32, 32).

    Images not 28x28 (digits, other MedMNIST sizes) are resized to 28x28, then every
    image is zero-padded to 32x32 and scaled to [0, 1] on its own (min-max), so that
    sources of another contrast meet the base on the same scale.
    """
    from monai.transforms import Compose, Resize, ScaleIntensity, SpatialPad

    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected grey images (N, 1, H, W), got {images.shape}")
    steps = []
    if images.shape[2:] != (SOURCE_SIZE, SOURCE_SIZE):
        steps.append(Resize((SOURCE_SIZE, SOURCE_SIZE), mode="bilinear", anti_aliasing=True))
    steps += [SpatialPad((IMAGE_SIZE, IMAGE_SIZE)), ScaleIntensity(channel_wise=True)]
    # The stack's samples stand in MONAI's channel axis: one call transforms them all,
    # each on its own (channel_wise), far faster than one call per image.
    out = Compose(steps)(torch.from_numpy(np.ascontiguousarray(images[:, 0])))
    out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
    return out.float().unsqueeze(1).contiguous()


class GroupImages(Dataset):
    """``(image, label, group)`` samples, half of them flipped left-right when training.

    Batches are read whole (``__getitems__``): the flip is MONAI's ``Flip`` applied once
    to the chosen images of a batch, which costs a fraction of a per-image random
    transform (MONAI's per-call metadata handling dominated a per-image ``RandFlip``).
    Use it with ``collate_fn=`` :func:`as_batch`.
    """

    def __init__(self, images: torch.Tensor, labels: np.ndarray, groups: np.ndarray, augment: bool, seed: int = 0) -> None:
        from monai.transforms import Flip

        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.float32)
        self.groups = torch.as_tensor(groups, dtype=torch.int64)
        # The stack (n, 1, H, W) is MONAI's (channels, *spatial) with spatial (1, H, W): axis 2 is W.
        self.flip = Flip(spatial_axis=2) if augment else None
        self.generator = torch.Generator().manual_seed(seed + 7919)  # its own stream, apart from the shuffle

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, rows: list[int]):
        index = torch.as_tensor(rows, dtype=torch.int64)
        x = self.images[index]
        if self.flip is not None:
            chosen = torch.rand(len(index), generator=self.generator) < 0.5
            if bool(chosen.any()):
                flipped = self.flip(x[chosen])
                x[chosen] = flipped.as_tensor() if hasattr(flipped, "as_tensor") else flipped
        return x, self.labels[index], self.groups[index]


def as_batch(batch):
    """The DataLoader's collate step for :class:`GroupImages`: its batches are whole already."""
    return batch


@lru_cache(maxsize=16)
def _prepared(images: ImageSet) -> torch.Tensor:
    """:func:`preprocess` once per ImageSet (by identity: the cached site sets come back each round)."""
    return preprocess(images.images)


def loader(images: ImageSet, batch_size: int, shuffle: bool, seed: int = 0, augment: bool | None = None) -> DataLoader:
    """Batches of ``(x, y, group)`` of an ImageSet with binary labels, preprocessed once.

    ``augment`` (default: as ``shuffle``) flips half the images left-right (MONAI ``Flip``). The order and the
    flips are seeded: a site's loader is the same in every round.
    """
    augment = shuffle if augment is None else augment
    dataset = GroupImages(_prepared(images), images.labels, images.groups, augment, seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=as_batch,
                      generator=torch.Generator().manual_seed(seed))


def pooled(dataset: str, num_partitions: int, per_site: int, seed: int, split: str, root: str = DEFAULT_ROOT) -> ImageSet:
    """All simulated sites' train or test images together (central evaluation, central.py)."""
    index = {"train": 0, "test": 1}[split]
    parts = [site_task(dataset, p, num_partitions, per_site, seed, root)[index] for p in range(num_partitions)]
    return ImageSet(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.groups for p in parts]),
        GROUP_NAMES,
    )
