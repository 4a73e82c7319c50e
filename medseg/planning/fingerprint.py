"""Dataset fingerprint: what the planner needs to know about a dataset, measured once and cached.

Like nnU-Net's fingerprint extractor (shapes, spacings, foreground intensities), plus what cells need: the
object size distribution and how often objects touch. Written as ``fingerprint.json`` and reused while the
dataset's content is unchanged: the digest is a hash of the files' bytes, and a file whose size and
modification time match the stored record is not hashed again, so an unchanged dataset costs one ``stat``
per file.

Axes follow medseg's convention (``x y [z]``, as MONAI loads the files); sizes are in voxels, spacings in
the file's physical unit (mm for scans, 1 for raster images).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.data.datalist import Case, DatasetInfo, discover
from medseg.data.readers import load_image, spacing_of
from medseg.errors import DataError
from medseg.metrics import equivalent_diameter

log = logging.getLogger(__name__)

FORMAT = "medseg-fingerprint-v1"
SAMPLES_PER_CASE = 10_000  # foreground intensities kept per case for the statistics (nnU-Net: 10,000)
CT_NAMES = ("ct",)
MR_NAMES = ("mr", "mri", "t1", "t1w", "t1gd", "t2", "t2w", "flair", "adc", "dwi", "pd")


@dataclass
class CaseFingerprint:
    name: str
    shape: list[int]  # spatial, voxels
    spacing: list[float]
    foreground_fraction: float


@dataclass
class ChannelStats:
    """Intensities of one channel inside the foreground (all voxels where no label is > 0)."""

    name: str
    modality: str  # "CT", "MR" or "other"
    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float
    min: float
    max: float
    integer_valued: bool  # every voxel an integer: 8/16-bit microscopy or CT counts
    bits: int | None  # 8 or 16 when integer-valued within 0..255 / 0..65535 (unsigned raster data), else None


@dataclass
class ObjectStats:
    """Instance objects (one id per object in the label maps)."""

    count: int
    diameter: dict[str, float]  # equivalent diameter (of a disc / ball of the same area / volume), voxels
    extent: dict[str, list[float]]  # per axis bounding-box extent, voxels: p10 / median / p90
    touching_share: float  # share of objects sharing a face with another object


@dataclass
class Fingerprint:
    digest: str
    root: str
    spatial_dims: int
    label_kind: str
    channel_names: list[str]
    cases: list[CaseFingerprint]
    channels: list[ChannelStats]
    class_fractions: dict[str, float]  # label value (as a string) -> share of all voxels
    objects: ObjectStats | None = None
    files: dict[str, list] = field(default_factory=dict)  # relative path -> [size, mtime_ns, sha256]
    format: str = FORMAT

    @property
    def median_shape(self) -> list[float]:
        return [float(v) for v in np.median([c.shape for c in self.cases], axis=0)]

    @property
    def median_spacing(self) -> list[float]:
        return [float(v) for v in np.median([c.spacing for c in self.cases], axis=0)]

    @property
    def modality(self) -> str:
        """``"CT"`` when every channel is CT, ``"MR"`` when every channel is MR, else ``"other"``."""
        kinds = {c.modality for c in self.channels}
        return kinds.pop() if len(kinds) == 1 else "other"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        d = dict(d)
        d["cases"] = [CaseFingerprint(**c) for c in d["cases"]]
        d["channels"] = [ChannelStats(**c) for c in d["channels"]]
        d["objects"] = ObjectStats(**d["objects"]) if d.get("objects") else None
        return cls(**d)


def modality_of(channel_name: str) -> str:
    """``CT``, ``MR`` or ``other`` from a dataset.json ``channel_names``/``modality`` entry."""
    name = channel_name.strip().lower()
    if name in CT_NAMES:
        return "CT"
    return "MR" if name in MR_NAMES or name.startswith(("mr", "t1", "t2")) else "other"


# -- the digest ----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _case_files(dataset: DatasetInfo) -> list[Path]:
    return [p for case in dataset.cases for p in [*case.images, *([case.label] if case.label else [])]]


def content_digest(dataset: DatasetInfo, known: dict[str, list] | None = None) -> tuple[str, dict[str, list]]:
    """A hash of the training files' names and bytes, and the per-file records it came from.

    ``known``: records of an earlier call (relative path -> ``[size, mtime_ns, sha256]``); a file with the
    same size and modification time keeps its recorded hash instead of being read again.
    """
    known = known or {}
    records: dict[str, list] = {}
    for path in sorted(_case_files(dataset)):
        inside = _inside(path, dataset.root)
        rel = str(Path(path).resolve().relative_to(dataset.root.resolve())) if inside else str(path)
        st = Path(path).stat()
        old = known.get(rel)
        sha = old[2] if old and old[0] == st.st_size and old[1] == st.st_mtime_ns else _sha256(Path(path))
        records[rel] = [st.st_size, st.st_mtime_ns, sha]
    h = hashlib.sha256()
    for rel, (_, _, sha) in records.items():
        h.update(f"{rel}\0{sha}\n".encode())
    return h.hexdigest(), records


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


# -- measuring -----------------------------------------------------------------------------------------


def _objects(instance: np.ndarray) -> tuple[list[float], list[list[int]], set[int], int]:
    """Equivalent diameters, per-axis extents and ids touching another object, of one instance map."""
    ids, counts = np.unique(instance[instance > 0], return_counts=True)
    dims = instance.ndim
    diameters = [equivalent_diameter(c, dims) for c in counts]
    extents = [[s.stop - s.start for s in sl] for sl in ndimage.find_objects(instance.astype(np.int64)) if sl]
    touching: set[int] = set()
    for axis in range(dims):
        a = np.moveaxis(instance, axis, 0)
        lo, hi = a[:-1], a[1:]
        contact = (lo > 0) & (hi > 0) & (lo != hi)
        touching.update(np.unique(lo[contact]).tolist())
        touching.update(np.unique(hi[contact]).tolist())
    return diameters, extents, touching, len(ids)


def _measure_case(case: Case, index: int, label_kind: str) -> dict[str, Any]:
    image = load_image(case.images)
    if case.label is None:
        raise DataError(case.images[0], "a training case without a label: the fingerprint needs labels")
    label_img = load_image(case.label)
    img = np.asarray(image, dtype=np.float64)  # C *S
    label = np.rint(np.asarray(label_img[0])).astype(np.int64)
    if label.shape != img.shape[1:]:
        raise DataError(case.label, f"label shape {label.shape} differs from the image's {img.shape[1:]}")
    fg = label > 0
    rng = np.random.default_rng(index)
    values = img[:, fg] if fg.any() else img.reshape(img.shape[0], -1)  # no foreground: the whole image
    if values.shape[1] > SAMPLES_PER_CASE:
        values = values[:, rng.choice(values.shape[1], SAMPLES_PER_CASE, replace=False)]
    out = {
        "case": CaseFingerprint(case.name, list(label.shape), [round(s, 6) for s in spacing_of(image)],
                                float(fg.mean())),
        "samples": values,
        "min": img.reshape(img.shape[0], -1).min(1),
        "max": img.reshape(img.shape[0], -1).max(1),
        "integer": [bool(np.all(np.mod(c, 1) == 0)) for c in img],
        "classes": dict(zip(*(v.tolist() for v in np.unique(label, return_counts=True)))),
    }
    if label_kind == "instance":
        out["objects"] = _objects(label)
    return out


def _channel_stats(names: list[str], measured: list[dict]) -> list[ChannelStats]:
    out = []
    for c, name in enumerate(names):
        v = np.concatenate([m["samples"][c] for m in measured])
        low, high = float(min(m["min"][c] for m in measured)), float(max(m["max"][c] for m in measured))
        integer = all(m["integer"][c] for m in measured)
        bits = (8 if high <= 255 else 16 if high <= 65535 else None) if integer and low >= 0 else None
        out.append(ChannelStats(
            name=name, modality=modality_of(name), mean=float(v.mean()), std=float(v.std()),
            percentile_00_5=float(np.percentile(v, 0.5)), percentile_99_5=float(np.percentile(v, 99.5)),
            min=low, max=high, integer_valued=integer, bits=bits,
        ))
    return out


def _object_stats(measured: list[dict]) -> ObjectStats:
    diameters = [d for m in measured for d in m["objects"][0]]
    extents = np.array([e for m in measured for e in m["objects"][1]], dtype=float)
    touching = sum(len(m["objects"][2]) for m in measured)
    count = sum(m["objects"][3] for m in measured)
    if not count:
        return ObjectStats(0, {}, {}, 0.0)
    pct = {"p10": 10, "median": 50, "p90": 90}
    return ObjectStats(
        count=count,
        diameter={k: float(np.percentile(diameters, q)) for k, q in pct.items()},
        extent={k: [float(v) for v in np.percentile(extents, q, axis=0)] for k, q in pct.items()},
        touching_share=touching / count,
    )


def _channel_names(dataset: DatasetInfo, n: int) -> list[str]:
    names = dataset.channel_names or {}
    return [str(names.get(str(c), f"channel{c}")) for c in range(n)]


def extract_fingerprint(dataset: DatasetInfo, digest: str = "", files: dict[str, list] | None = None) -> Fingerprint:
    """Read every training case once and measure it (see the module docstring)."""
    if not dataset.cases:
        raise DataError(dataset.root, "no training cases to fingerprint")
    measured = [_measure_case(case, i, dataset.label_kind) for i, case in enumerate(dataset.cases)]
    n_channels = measured[0]["samples"].shape[0]
    for case, m in zip(dataset.cases, measured):
        if m["samples"].shape[0] != n_channels:
            raise DataError(case.images[0], f"{m['samples'].shape[0]} channels, the first case has {n_channels}")
    totals: dict[int, int] = {}
    for m in measured:
        for value, count in m["classes"].items():
            totals[value] = totals.get(value, 0) + count
    voxels = sum(totals.values())
    if dataset.label_kind == "instance":  # object ids are not classes: background vs objects
        fg = sum(c for v, c in totals.items() if v > 0)
        fractions = {"0": totals.get(0, 0) / voxels, "1": fg / voxels}
    else:
        fractions = {str(v): c / voxels for v, c in sorted(totals.items())}
    return Fingerprint(
        digest=digest,
        root=str(dataset.root),
        spatial_dims=len(measured[0]["case"].shape),
        label_kind=dataset.label_kind,
        channel_names=_channel_names(dataset, n_channels),
        cases=[m["case"] for m in measured],
        channels=_channel_stats(_channel_names(dataset, n_channels), measured),
        class_fractions=fractions,
        objects=_object_stats(measured) if dataset.label_kind == "instance" else None,
        files=files or {},
    )


def fingerprint_dataset(root: str | Path, path: str | Path | None = None, *, refresh: bool = False
                        ) -> tuple[Fingerprint, bool]:
    """The fingerprint of the dataset at ``root``, reused from ``path`` when its content is unchanged.

    Args:
        root: dataset folder (images/ + labels/ or a dataset.json).
        path: where ``fingerprint.json`` is kept (default ``root/fingerprint.json``).
        refresh: measure again even if the stored digest matches.

    Returns:
        ``(fingerprint, reused)``.

    Raises:
        DataError: the dataset has no cases, discovery errors, or an unreadable case (naming the file).
    """
    dataset = discover(root)
    errors = [p for p in dataset.problems if p.severity == "error"]
    if errors:
        raise DataError(root, "dataset problems (run `medseg check`):\n" + "\n".join(map(str, errors)))
    path = Path(path) if path is not None else Path(root) / "fingerprint.json"
    stored = _read(path)
    digest, files = content_digest(dataset, stored.files if stored else None)
    if stored is not None and stored.digest == digest and not refresh:
        log.info("dataset unchanged (digest %s): reusing %s", digest[:12], path)
        if stored.files != files:  # same bytes, new times (a copy, a touch): remember them, hash less next time
            stored.files = files
            _write(stored, path)
        return stored, True
    fingerprint = extract_fingerprint(dataset, digest, files)
    _write(fingerprint, path)
    return fingerprint, False


def _write(fingerprint: Fingerprint, path: Path) -> None:
    try:
        path.write_text(json.dumps(fingerprint.to_dict(), indent=1) + "\n")
    except OSError as err:
        log.warning("cannot write %s (%s); the fingerprint is not cached", path, err)


def _read(path: Path) -> Fingerprint | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        return Fingerprint.from_dict(d) if d.get("format") == FORMAT else None
    except (ValueError, TypeError, KeyError) as err:
        log.warning("ignoring unreadable %s (%s); measuring again", path, err)
        return None
