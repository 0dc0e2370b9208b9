"""FairFedMed-Oph (Li et al. 2025, "FairFedMed: Benchmarking Group Fairness in Federated
Medical Imaging with FairLoRA"): per-patient ``.npz`` files split into sites by CSV.

Schema, as the benchmark's own code and the data's README describe it
-------------------------------------------------------------------------
Sources: github.com/Harvard-AI-and-Robotics-Lab/FairFedMed, ``README.md`` (layout, group
counts per site) and ``utils/data_utils.py`` (class ``FairFedMedDataset``, the loader
the paper used); github.com/Harvard-Ophthalmology-AI-Lab/FairCLIP ``README.md`` (codes
of the Harvard-FairVLMed npz fields that FairFedMed reuses).

* Layout under the dataset root (``DATA/fairfedmed``)::

      all/<filename>.npz                   one file per patient
      meta_all.csv
      meta_site{k}_{attribute}_train.csv   k = 1, 2, 3; attribute = race, language,
      meta_site{k}_{attribute}_test.csv    ethnicity, ... (one CSV set per attribute)
      meta_site{k}_{attribute}.csv         train and test together

  The site CSVs must have a ``filename`` column naming a file in ``all/``; the reference
  loader reads nothing else from them. There is no validation split.
* npz keys (sizes from the reference loader's comments): ``slo_fundus`` (2-D SLO
  fundus, 224 x 224), ``oct_bscans`` (3-D OCT, 128 x 200 x 200; empty for patients
  without a scan), ``glaucoma`` (0/1 label, read as ``float(x.item())``), and 0-d
  integer demographics read with ``.item()``. Codes, from the FairVLMed README:
  ``race`` Asian 0, Black 1, White 2; ``gender`` Female 0, Male 1; ``ethnicity``
  non-Hispanic 0, Hispanic 1; ``language`` English 0, Spanish 1, Other 2;
  ``maritalstatus`` Married or partnered 0, Single 1, Divorced 2, Widowed 3, Legally
  separated 4; ``-1`` = unknown. The FairFedMed README's "Unknown" language and
  ethnicity counts are these -1 rows: the reference loader drops them
  (``if attr > -1``), as it drops patients whose chosen image array is empty.
  FairFedMed's ``trainers/GLP_OT_SVLoRA.py`` names the race, language and ethnicity
  groups in the same order (its gender prompt list reads Male, Female; the codes
  above follow the data README).
* The reference loader also accepts the attribute ``hispanic``, and Harvard's
  FairGenMed release (huggingface.co/datasets/harvardairobotics/FairGenMed, card)
  stores gender as ``male`` and ethnicity as ``hispanic`` with the same codes, so
  those keys are read when ``gender`` / ``ethnicity`` are absent.
* The reference loader transposes ``slo_fundus`` (``np.transpose``) before use; this
  loader does the same so that images match the benchmark's. It does not resize:
  every image of a load must share one shape.

The attribute value comes from the npz, as in the reference loader; a CSV column named
after the attribute (or ``{attribute}_label``, the FairFedMed-Chest convention) is used
only for files that lack the key.

Core module: numpy and the standard library (``csv``) only; never imports flwr or pandas.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from .images import ImageSet, to_unit_float

logger = logging.getLogger(__name__)

DATA_DIR = "all"
SPLIT_SUFFIX = {"train": "_train", "test": "_test", "all": ""}
IMAGE_KEYS = ("slo_fundus", "fundus", "oct_bscans")  # tried in this order when image_key is None
ATTRIBUTE_ALIASES = {"gender": ("male",), "ethnicity": ("hispanic",)}
GROUP_NAMES = {
    "race": ("Asian", "Black", "White"),
    "gender": ("Female", "Male"),
    "male": ("Female", "Male"),
    "ethnicity": ("Non-Hispanic", "Hispanic"),
    "hispanic": ("Non-Hispanic", "Hispanic"),
    "language": ("English", "Spanish", "Other"),
    "maritalstatus": ("Married or Partnered", "Single", "Divorced", "Widowed", "Legally Separated"),
}
SKIP_REASONS = ("unknown_attribute", "missing_file", "empty_image")
_SITE_CSV = re.compile(r"^meta_site(\d+)_(.+?)(?:_(train|test))?\.csv$")
_RGB_CHANNELS = 3


@dataclass(frozen=True, eq=False)
class FairFedMedSet(ImageSet):
    """An :class:`ImageSet` that also says which files it holds and which rows it skipped.

    Parameters
    ----------
    images, labels, groups, group_names
        As in :class:`ImageSet`.
    skipped : Mapping[str, int]
        Rows left out, by reason: ``unknown_attribute`` (code -1), ``missing_file``
        (not in ``all/``) and ``empty_image`` (the image array has no elements).
    filenames : tuple of str
        The npz file of each sample, in order.
    """

    skipped: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    filenames: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.filenames) != len(self):
            raise ValueError(f"{len(self.filenames)} filenames for {len(self)} samples")

    @property
    def num_skipped(self) -> int:
        """Rows skipped for any reason."""
        return sum(self.skipped.values())


def fairfedmed_sites(root: str | os.PathLike) -> list[str]:
    """Sites that have ``meta_site{k}_*.csv`` files, as ``["site1", "site2", ...]``.

    Parameters
    ----------
    root : str or os.PathLike
        The FairFedMed directory, or its parent holding ``fairfedmed/``.

    Returns
    -------
    list of str
        Site names in numeric order.

    Raises
    ------
    FileNotFoundError
        If ``root`` is not a directory or holds no site CSV.
    """
    root = _resolve_root(root)
    numbers = {int(m.group(1)) for name in os.listdir(root) if (m := _SITE_CSV.match(name))}
    if not numbers:
        raise FileNotFoundError(f"no meta_site{{k}}_{{attribute}}[_train|_test].csv files in {root}")
    return [f"site{k}" for k in sorted(numbers)]


def load_fairfedmed(
    root: str | os.PathLike,
    site: str | int | None = None,
    split: str = "train",
    attribute: str = "race",
    image_key: str | None = None,
    label_key: str = "glaucoma",
) -> FairFedMedSet:
    """Load one site (or all sites) of FairFedMed-Oph with one demographic attribute.

    Parameters
    ----------
    root : str or os.PathLike
        The FairFedMed directory (holding ``all/`` and the CSVs), or its parent.
    site : str or int, optional
        ``"site2"``, ``"2"`` or ``2``; all sites, in order, when omitted.
    split : {"train", "test", "all"}
        Which CSV to read: ``meta_site{k}_{attribute}_{split}.csv``, or
        ``meta_site{k}_{attribute}.csv`` for ``"all"``.
    attribute : str
        The demographic whose codes become the group ids (``race``, ``gender``,
        ``ethnicity``, ``language``, ``maritalstatus``). It also names the CSV.
    image_key : str, optional
        npz key of the images; the first of ``slo_fundus``, ``fundus``, ``oct_bscans``
        present in the first usable file when omitted.
    label_key : str
        npz key of the 0-d integer label.

    Returns
    -------
    FairFedMedSet
        Images (N, 1, H, W) for 2-D grey, (N, 3, H, W) for RGB (H, W, 3) arrays or
        (N, 1, D, H, W) for volumes (``oct_bscans`` always), in [0, 1]; labels (N,);
        groups are the attribute codes, named by ``group_names``; ``skipped`` counts
        the rows left out (also logged: WARNING when files are missing or empty).

    Raises
    ------
    FileNotFoundError
        If the root, ``all/`` or a needed CSV is missing.
    ValueError
        For an unknown split or site, a CSV without ``filename``, a file lacking the
        image, label or attribute key, a non-integer code, a code with no group name,
        images of differing shapes, or when no row is usable.

    Notes
    -----
    Everything is loaded into memory. A 128 x 200 x 200 OCT volume is about 20 MB as
    float32, so one site's ~4,000 OCT patients need about 80 GB; the SLO images of a
    site need about 0.8 GB.
    """
    if split not in SPLIT_SUFFIX:
        raise ValueError(f"unknown split {split!r} for FairFedMed: expected one of {tuple(SPLIT_SUFFIX)}")
    root = _resolve_root(root)
    data_dir = os.path.join(root, DATA_DIR)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"FairFedMed data directory not found: {data_dir}")
    sites = fairfedmed_sites(root) if site is None else [_site_name(site, fairfedmed_sites(root))]
    csv_paths = [_csv_path(root, name, attribute, split) for name in sites]
    reader = _Reader(data_dir, attribute, image_key, label_key)
    for path in csv_paths:
        for row in _read_rows(path):
            reader.add(row)
    return reader.finish(csv_paths)


class _Reader:
    """Accumulates usable rows and skip counts across the CSVs of one load."""

    def __init__(self, data_dir: str, attribute: str, image_key: str | None, label_key: str) -> None:
        self.data_dir, self.attribute, self.image_key, self.label_key = data_dir, attribute, image_key, label_key
        self.images: list[np.ndarray] = []
        self.labels: list[int] = []
        self.codes: list[int] = []
        self.files: list[str] = []
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)

    def add(self, row: Mapping[str, str]) -> None:
        name = (row.get("filename") or "").strip()
        path = os.path.join(self.data_dir, name)
        if not name or not os.path.isfile(path):
            self.skipped["missing_file"] += 1
            return
        with np.load(path, allow_pickle=False) as npz:
            # The attribute first: an unknown patient is skipped without reading its image.
            code = _attribute_code(npz, row, self.attribute, path)
            if code < 0:
                self.skipped["unknown_attribute"] += 1
                return
            key = self.image_key or _detect_image_key(npz, path)
            raw = _require(npz, key, path)
            if raw.size == 0:
                self.skipped["empty_image"] += 1
                return
            label = _scalar_int(_require(npz, self.label_key, path), f"{path}[{self.label_key!r}]")
        self.image_key = key  # every later file must hold the same key
        image = _channels_first(raw, key, path)
        if self.images and image.shape != self.images[0].shape:
            raise ValueError(
                f"{path}[{key!r}] has shape {image.shape} after conversion, but "
                f"{self.files[0]} has {self.images[0].shape}; resize the files to one shape"
            )
        self.images.append(image)
        self.labels.append(label)
        self.codes.append(code)
        self.files.append(name)

    def finish(self, csv_paths: list[str]) -> FairFedMedSet:
        level = logging.WARNING if self.skipped["missing_file"] or self.skipped["empty_image"] else logging.INFO
        logger.log(level, "FairFedMed %s: loaded %d, skipped %s",
                   ", ".join(os.path.basename(p) for p in csv_paths), len(self.images), self.skipped)
        if not self.images:
            raise ValueError(f"no usable rows in {csv_paths}: skipped {self.skipped}")
        codes = np.asarray(self.codes, dtype=np.int64)
        names = _group_names(self.attribute, codes, self.files)
        return FairFedMedSet(
            images=np.stack(self.images),
            labels=np.asarray(self.labels, dtype=np.int64),
            groups=codes,
            group_names=names,
            skipped=MappingProxyType(dict(self.skipped)),
            filenames=tuple(self.files),
        )


def _resolve_root(root: str | os.PathLike) -> str:
    """Accept the dataset directory or its parent ``DATA/`` (the reference's ``--root``)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"FairFedMed root is not a directory: {root}")
    nested = os.path.join(root, "fairfedmed")
    has_csv = any(_SITE_CSV.match(name) for name in os.listdir(root))
    return nested if not has_csv and os.path.isdir(nested) else root


def _site_name(site: str | int, available: list[str]) -> str:
    text = str(site).strip().lower()
    name = text if text.startswith("site") else f"site{text}"
    if name not in available:
        raise ValueError(f"unknown FairFedMed site {site!r}: available sites are {available}")
    return name


def _csv_path(root: str, site: str, attribute: str, split: str) -> str:
    path = os.path.join(root, f"meta_{site}_{attribute}{SPLIT_SUFFIX[split]}.csv")
    if not os.path.isfile(path):
        have = sorted({m.group(2) for n in os.listdir(root)
                       if (m := _SITE_CSV.match(n)) and f"site{m.group(1)}" == site
                       and (m.group(3) or "all") == split})
        raise FileNotFoundError(f"FairFedMed CSV not found: {path}; {site} has {split!r} CSVs for attributes {have}")
    return path


def _read_rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "filename" not in reader.fieldnames:
            raise ValueError(f"{path} has no 'filename' column; columns: {reader.fieldnames}")
        return list(reader)


def _require(npz: np.lib.npyio.NpzFile, key: str, path: str) -> np.ndarray:
    if key not in npz.files:
        raise ValueError(f"{path} has no key {key!r}; keys present: {sorted(npz.files)}")
    return npz[key]


def _detect_image_key(npz: np.lib.npyio.NpzFile, path: str) -> str:
    for key in IMAGE_KEYS:
        if key in npz.files:
            return key
    raise ValueError(f"{path} has none of the image keys {IMAGE_KEYS}; keys present: {sorted(npz.files)}; "
                     "pass image_key")


def _attribute_code(npz: np.lib.npyio.NpzFile, row: Mapping[str, str], attribute: str, path: str) -> int:
    for key in (attribute, *ATTRIBUTE_ALIASES.get(attribute, ())):
        if key in npz.files:
            return _scalar_int(npz[key], f"{path}[{key!r}]")
    for column in (attribute, f"{attribute}_label"):
        if column in row:
            return _csv_code(row[column], f"CSV column {column!r} for {path}")
    keys = (attribute, *ATTRIBUTE_ALIASES.get(attribute, ()))
    raise ValueError(f"{path} has no attribute key {' or '.join(map(repr, keys))} and its CSV row has no "
                     f"{attribute!r} column; keys present: {sorted(npz.files)}")


def _csv_code(cell: str | None, source: str) -> int:
    text = (cell or "").strip()
    if not text:
        return -1  # an empty cell is an unrecorded value, the same as -1
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{source} holds {text!r}, not an integer code") from None
    return _scalar_int(np.asarray(number), source)


def _scalar_int(value: np.ndarray, source: str) -> int:
    """A stored 0-d (or one-element) integral number as int; labels may be stored as 1.0."""
    if value.size != 1 or value.dtype.kind not in "biuf":
        raise ValueError(f"{source} must be one integer, got dtype {value.dtype} shape {value.shape}")
    number = value.reshape(()).item()
    if isinstance(number, float) and not number.is_integer():  # also rejects NaN and inf
        raise ValueError(f"{source} must be an integer code, got {number}")
    return int(number)


def _channels_first(raw: np.ndarray, key: str, path: str) -> np.ndarray:
    source = f"{path}[{key!r}]"
    if raw.ndim == 2:
        # The reference loader transposes slo_fundus; match it so images equal the benchmark's.
        out = (raw.T if key == "slo_fundus" else raw)[None]
    elif raw.ndim == 3 and raw.shape[-1] == _RGB_CHANNELS and key != "oct_bscans":
        # OCT is always a volume, even one 3 pixels wide; other keys ending in 3 are RGB.
        out = np.moveaxis(raw, -1, 0)
    elif raw.ndim == 3:
        out = raw[None]
    else:
        raise ValueError(f"{source}: expected (H, W), (H, W, 3) or (D, H, W), got shape {raw.shape}")
    return np.ascontiguousarray(to_unit_float(out, source))


def _group_names(attribute: str, codes: np.ndarray, files: list[str]) -> tuple[str, ...]:
    names = GROUP_NAMES.get(attribute)
    if names is None:
        # Unknown attribute: name codes by themselves so group_names still indexes groups.
        return tuple(str(code) for code in range(int(codes.max()) + 1))
    bad = np.flatnonzero(codes >= len(names))
    if bad.size:
        raise ValueError(f"{files[bad[0]]}: {attribute} code {codes[bad[0]]} has no name; "
                         f"known codes 0..{len(names) - 1} = {names}")
    return names
