"""Loaders for the medical image formats users bring (MedMNIST ``.npz``, FairFedMed) and
for Fashion-MNIST (Debian's IDX files) with scikit-learn's digits as a small fallback.

Core package: numpy and the standard library only, never imports flwr or pandas.
Every loader returns an :class:`ImageSet` (channels-first float32 images in [0, 1],
int64 labels and group ids, ``-1`` = unknown group).
"""

from .fairfedmed import FairFedMedSet, fairfedmed_sites, load_fairfedmed
from .fashion_mnist import load_digits_images, load_fashion_mnist
from .images import ImageSet
from .medmnist import load_medmnist

__all__ = [
    "FairFedMedSet",
    "ImageSet",
    "fairfedmed_sites",
    "load_digits_images",
    "load_fairfedmed",
    "load_fashion_mnist",
    "load_medmnist",
]
