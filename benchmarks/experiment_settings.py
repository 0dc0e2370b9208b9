"""Settings for ``benchmarks/experiment.py``: a frozen base, adapter targets, sites, a test set.

Each setting is built for one seed (the seed draws the split, the pretrained base and the
adapter initialisation, so every rule run on that seed is paired) and one regime (the
options of :class:`Regime`). Data ships offline: scikit-learn's digits, Debian's
Fashion-MNIST (``apt-get install dataset-fashion-mnist``).

``digits``
    The digits transformer (2 blocks, q/k/v/o/ff1/ff2 adapted, rank 8), base pretrained on
    digits 0-5 of a disjoint pool, sites fine-tune on all ten digits (Dirichlet label skew).
    Metric: accuracy. The regime sweep and heterogeneous ranks run here.
``fmnist``
    An MLP on Fashion-MNIST (784-256-128, both hidden layers adapted), base pretrained on
    classes 0-5 of 10,000 held-out images; sites (any number: the many-clients setting
    uses 100) fine-tune on all ten classes of the other 50,000. Metric: accuracy.
``fmnist-conv``
    The imaging app's data and adapter type at a size 2 CPU cores can sweep: a small CNN
    (:class:`FashionCNN`) on Fashion-MNIST, base pretrained on classes 0-5 of 10,000
    held-out images, adapters on the second convolution (:class:`~fedlowrank.adapters.SVDConv`)
    and the hidden linear layer; 5 sites of 800 images (all ten classes), 2,000 test
    images. Metric: accuracy.
``fmnist-groups``
    The per-group setting: the same images, a binary task whose label rule depends on a
    group attribute drawn at random per image (so no pixel tells it): group A calls
    upper-body garments positive, group B outerwear and footwear
    (:data:`fedlowrank.datasets.fashion_mnist.GROUP_RULES`, the imaging app's rules). A G = 1 model cannot fit both rules on the classes where they
    disagree; FairLoRA's per-group singular values can. Metric: AUC, worst-group AUC.
``digits-mlp``
    The digits split and base pretraining with an MLP instead of the transformer
    (64-128-128, both hidden layers adapted): the model where heterogeneous ranks showed
    the opposite sign to the transformer. Metric: accuracy.
``fmnist-densenet``
    The imaging app's MONAI DenseNet (``fairlora_images.model.DENSENET``: 42,594
    parameters, 32x32 inputs) on ten-class Fashion-MNIST, adapters where the app puts them
    (the last dense block's convolutions and the classifier), base pretrained on classes
    0-5 of 10,000 held-out images; 5 sites of 800 images, 2,000 test images, as
    ``fmnist-conv``. Metric: accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlowrank.adapters import adapter_layers, inject_adapters
from fedlowrank.datasets.fashion_mnist import GROUP_NAMES, relabel_by_group


@dataclass(frozen=True)
class Regime:
    """How clients train and how the federation is drawn: the knobs of a regime sweep."""

    lr: float = 1e-2
    local_epochs: int = 1
    rounds: int = 15
    sites: int = 5
    fraction: float = 1.0
    alpha: float = 0.5
    rank: int = 8
    client_ranks: tuple[int, ...] = ()
    init: str = "lora"
    batch_size: int = 32

    def label(self) -> str:
        parts = [f"lr={self.lr:g}", f"E={self.local_epochs}", f"init={self.init}", f"r={self.rank}"]
        if self.client_ranks:
            parts.append("ranks=" + "/".join(map(str, self.client_ranks)))
        if self.sites != 5 or self.fraction != 1.0:
            parts.append(f"sites={self.sites}x{self.fraction:g}")
        return " ".join(parts)


@dataclass
class Setting:
    """One seed's federated problem."""

    name: str
    base: nn.Module  # the frozen base (pretrained; PiSSA-residualised when init = "pissa")
    targets: str
    trainable: str
    site_train: list  # per site: list of (x, y, group) batches
    site_test: list
    test: list  # pooled test batches
    binary: bool
    groups: int = 1
    group_names: tuple[str, ...] = ()
    init_factors: dict = field(default_factory=dict)  # module -> (U, V) for a non-zero start


# --------------------------------------------------------------------------- data helpers


def dirichlet_sites(labels: np.ndarray, rows: np.ndarray, sites: int, alpha: float, rng) -> list[np.ndarray]:
    """Split ``rows`` over ``sites`` with each label spread by a Dirichlet(alpha) draw."""
    parts: list[list[int]] = [[] for _ in range(sites)]
    for label in np.unique(labels[rows]):
        members = rng.permutation(rows[labels[rows] == label])
        cuts = (np.cumsum(rng.dirichlet(np.full(sites, alpha)))[:-1] * len(members)).astype(int)
        for site, chunk in enumerate(np.split(members, cuts)):
            parts[site].extend(chunk.tolist())
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def make_batches(x, y, g, rows, batch_size: int, shuffle: bool, seed: int = 0) -> list:
    rows = np.random.default_rng(seed).permutation(rows) if shuffle else np.asarray(rows)
    return [(x[rows[i : i + batch_size]], y[rows[i : i + batch_size]], g[rows[i : i + batch_size]])
            for i in range(0, len(rows), batch_size)]


def pretrain(model: nn.Module, x, y, rows, epochs: int, lr: float, seed: int) -> dict:
    """Train every weight of the base on its own population; returns the state dict."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for xb, yb, _ in make_batches(x, y, y, rows, 64, True, seed + epoch):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pissa_split(base: nn.Module, targets: str, rank: int) -> dict:
    """PiSSA-style start: each target's top-``rank`` SVD part moves into the adapter.

    The base keeps ``W - u_r s_r v_r^T`` and the adapter starts at
    ``U = u_r sqrt(s_r)``, ``V = v_r sqrt(s_r)``, so the model starts where the base was,
    with both factors non-zero (where averaging factors separately loses most).
    """
    probe = _copy(base)
    names = inject_adapters(probe, targets, rank=rank)
    factors = {}
    for name in names:
        module = base.get_submodule(name)
        u, s, vh = torch.linalg.svd(module.weight.detach().double(), full_matrices=False)
        root = s[:rank].sqrt()
        big_u, big_v = u[:, :rank] * root, vh[:rank].T * root
        with torch.no_grad():
            module.weight.sub_((big_u @ big_v.T).to(module.weight.dtype))
        factors[name] = (big_u.float(), big_v.float())
    return factors


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def start_factors(model: nn.Module, setting: Setting) -> None:
    """Put the setting's non-zero start into an adapted model (scale 1: alpha = rank)."""
    for name, layer in adapter_layers(model).items():
        if name in setting.init_factors:
            u, v = setting.init_factors[name]
            r = min(layer.rank, u.shape[1])
            with torch.no_grad():
                layer.lora_U.zero_()
                layer.lora_U[:, :r].copy_(u[:, :r] / layer.scale**0.5)
                layer.lora_V[:, :r].copy_(v[:, :r] / layer.scale**0.5)
                layer.lora_S.fill_(1.0)


# --------------------------------------------------------------------------- digits


class Block(nn.Module):
    """Pre-norm transformer block with separate q/k/v/out projections (adaptable Linears)."""

    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n1(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(att)
        return x + self.ff2(F.gelu(self.ff1(self.n2(x))))


class DigitsTransformer(nn.Module):
    """8x8 digit -> 8 row tokens -> 2 blocks -> mean pool -> 10 logits."""

    def __init__(self, d: int = 64, heads: int = 4, ff: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(1, 8, d))
        self.blocks = nn.ModuleList(Block(d, heads, ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(-1, 8, 8)) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


@lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def digits(seed: int, regime: Regime, network=DigitsTransformer, targets: str = r"blocks\.\d+\.(q|k|v|o|ff1|ff2)",
           name: str = "digits") -> Setting:
    x, y = _digits()
    labels = y.numpy()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    test, pool = order[: int(0.3 * len(order))], order[int(0.3 * len(order)) :]
    cut = int(0.4 * len(pool))
    pre = pool[:cut][labels[pool[:cut]] <= 5]
    sites = dirichlet_sites(labels, pool[cut:], regime.sites, regime.alpha, rng)
    torch.manual_seed(seed)
    base = network()
    base.load_state_dict(pretrain(network(), x, y, pre, epochs=40, lr=3e-3, seed=seed))
    zeros = torch.zeros(len(labels), dtype=torch.long)
    return _finish(name, base, targets, r"head\..*", x, y, zeros, sites, test, regime, seed, binary=False)


class DigitsMLP(nn.Module):
    """8x8 digit -> 128 -> 128 -> 10 logits (ReLU)."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def digits_mlp(seed: int, regime: Regime) -> Setting:
    return digits(seed, regime, network=DigitsMLP, targets=r"fc[12]", name="digits-mlp")


# --------------------------------------------------------------------------- Fashion-MNIST


class FashionMLP(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(784, 256), nn.Linear(256, 128), nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


@lru_cache(maxsize=1)
def _fashion():
    from fedlowrank.datasets import load_fashion_mnist

    train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    x = torch.from_numpy(np.concatenate([train.images, test.images])).float()
    y = torch.from_numpy(np.concatenate([train.labels, test.labels])).long()
    return x, y, len(train.labels)


def _fashion_base(x, y, pre, seed: int, network=None, epochs: int = 3) -> nn.Module:
    # Seeded before the network exists: its initial weights, hence the pretrained base,
    # must not depend on what ran before in the process.
    network = network or FashionMLP
    torch.manual_seed(seed)
    base = network()
    base.load_state_dict(pretrain(network(), x, y, pre, epochs=epochs, lr=1e-3, seed=seed))
    return base


def _fashion_draw(seed: int):
    """The seed's generator, its order of the training images and the base's rows (classes 0-5
    of the first 10,000 in that order; the sites draw from the rest)."""
    x, y, n_train = _fashion()
    labels = y.numpy()
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_train)
    return x, y, labels, n_train, rng, order, order[:10_000][labels[order[:10_000]] <= 5]


def fmnist(seed: int, regime: Regime) -> Setting:
    x, y, labels, n_train, rng, order, pre = _fashion_draw(seed)
    pool = order[10_000:]
    test = np.arange(n_train, len(labels))
    sites = dirichlet_sites(labels, pool, regime.sites, regime.alpha, rng)
    zeros = torch.zeros(len(labels), dtype=torch.long)
    return _finish("fmnist", _fashion_base(x, y, pre, seed), r"fc[12]", r"head\..*", x, y, zeros, sites, test, regime, seed,
                   binary=False)


def fmnist_groups(seed: int, regime: Regime) -> Setting:
    x, y, n_train = _fashion()
    labels = y.numpy()
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_train)
    pre = order[:10_000]  # the base knows all ten classes: the binary rules are the new task
    pool = order[10_000:]
    test = np.arange(n_train, len(labels))
    # Sites differ in group mix (10% .. 90% group 1); the group never touches the pixels.
    sites = dirichlet_sites(labels, pool, regime.sites, regime.alpha, rng)
    share = np.linspace(0.1, 0.9, regime.sites)
    group = np.zeros(len(labels), dtype=np.int64)
    for site, rows in enumerate(sites):
        group[rows] = rng.random(len(rows)) < share[site]
    group[test] = rng.random(len(test)) < 0.5
    target = torch.from_numpy(relabel_by_group(labels, group))
    base = _fashion_base(x, y, pre, seed)
    torch.manual_seed(seed)
    base.head = nn.Linear(128, 1)  # a new binary head, trained in full
    return _finish("fmnist-groups", base, r"fc[12]", r"head\..*", x, target, torch.from_numpy(group), sites, test, regime,
                   seed, binary=True, groups=2, group_names=GROUP_NAMES)


def _finish(name, base, targets, trainable, x, y, g, sites, test, regime: Regime, seed: int, binary: bool,
            groups: int = 1, group_names=()) -> Setting:
    for p in base.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(seed + 1)
    site_train, site_test = [], []
    for i, rows in enumerate(sites):
        rows = rng.permutation(rows)
        cut = max(1, int(0.8 * len(rows)))
        site_train.append(make_batches(x, y, g, rows[:cut], regime.batch_size, True, seed=1000 * seed + i))
        site_test.append(make_batches(x, y, g, rows[cut:], 512, False))
    init = pissa_split(base, targets, regime.rank) if regime.init == "pissa" else {}
    if regime.init not in ("lora", "pissa"):
        raise ValueError(f"init must be 'lora' or 'pissa', got {regime.init!r}")
    return Setting(name, base, targets, trainable, site_train, site_test, make_batches(x, y, g, test, 1024, False),
                   binary, groups, tuple(group_names), init)


class FashionCNN(nn.Module):
    """A small CNN: two 3x3 convolutions (8, 16 channels, each pooled), a 64-unit layer, the head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc, self.head = nn.Linear(16 * 7 * 7, 64), nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x.view(-1, 1, 28, 28))), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.head(F.relu(self.fc(h.flatten(1))))


CONV_SITE_IMAGES = 800  # per site: small sites, and a 10-seed lr x epochs sweep that 2 cores finish
CONV_TEST_IMAGES = 2000


def fmnist_conv(seed: int, regime: Regime, network=FashionCNN, targets: str = r"conv2|fc", trainable: str = r"head\..*",
                name: str = "fmnist-conv") -> Setting:
    x, y, labels, n_train, rng, order, pre = _fashion_draw(seed)
    pool = order[10_000 : 10_000 + CONV_SITE_IMAGES * regime.sites]
    test = n_train + rng.permutation(len(labels) - n_train)[:CONV_TEST_IMAGES]
    sites = dirichlet_sites(labels, pool, regime.sites, regime.alpha, rng)
    base = _fashion_base(x, y, pre, seed, network, epochs=2)
    zeros = torch.zeros(len(labels), dtype=torch.long)
    return _finish(name, base, targets, trainable, x, y, zeros, sites, test, regime, seed, binary=False)


def _imaging_app_model():
    """The imaging app's DenseNet settings and adapter targets (one place: its model.py)."""
    import sys
    from pathlib import Path

    app = Path(__file__).resolve().parents[1] / "simulations" / "fairlora-images"
    if str(app) not in sys.path:
        sys.path.insert(0, str(app))
    from fairlora_images import model

    return model


class FashionDenseNet(nn.Module):
    """The imaging app's 10-class MONAI DenseNet as ``base``; 28x28 images zero-padded to its 32x32."""

    def __init__(self) -> None:
        super().__init__()
        self.base = _imaging_app_model().densenet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(F.pad(x.view(-1, 1, 28, 28), (2, 2, 2, 2)))


def fmnist_densenet(seed: int, regime: Regime) -> Setting:
    # No separate head: the adapted classifier (class_layers.out) is the last layer; its
    # bias is the one trained weight outside the adapters, as the heads are elsewhere.
    return fmnist_conv(seed, regime, FashionDenseNet, "|".join(_imaging_app_model().ADAPTER_TARGETS),
                       r"base\.class_layers\.out\.base\.bias", "fmnist-densenet")


SETTINGS = {"digits": digits, "digits-mlp": digits_mlp, "fmnist": fmnist, "fmnist-conv": fmnist_conv,
            "fmnist-densenet": fmnist_densenet, "fmnist-groups": fmnist_groups}
