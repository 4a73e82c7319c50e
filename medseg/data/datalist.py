"""Find the cases of a dataset folder in one of two layouts.

``folders``: ``images/`` and (optionally) ``labels/``, matched by case name whatever the extension on each
side (``images/a.png`` <-> ``labels/a.tif``). When labels exist, images ``<case>_0000``, ``<case>_0001``...
without a label of their own are the channels of ``<case>``. Without ``labels/`` the set is unlabelled.
A ``dataset.json`` beside ``images/`` (no ``imagesTr/``, no ``training`` list) still gives its keys.

``msd``: a ``dataset.json`` (Medical Segmentation Decathlon or nnU-Net v1/v2) beside ``imagesTr/``,
``labelsTr/``, ``imagesTs/`` and optionally ``labelsTs/``. The cases come from its ``training``/``test``
lists when present, else from scanning the folders; ``<case>_0000``-style files are channels. Its keys:
``labels`` (nnU-Net ``name -> id`` or MSD ``"id" -> name``), ``channel_names`` or ``modality``,
``file_ending``, ``numTraining`` and our ``label_kind`` (``"semantic"`` or ``"instance"``).

Hidden files (``.DS_Store``, ``._x.nii.gz``) and non-image files are listed in ``skipped`` (also in the folders
of a dataset.json that lists its cases); every other oddity becomes a :class:`Problem`, one per fault, so a check
can report them all at once.

Nothing outside the dataset folder is read: a listed entry (image, label, or a ``_0000`` channel file found for
a listed image) or a scanned file that resolves outside it (``../``, an absolute path, a symlink leading out) is
an error naming the entry, and it is never opened.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from medseg.data.readers import IMAGE_EXTENSIONS, is_image_path, split_name
from medseg.errors import DataError

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
LABEL_KINDS = ("semantic", "instance")


@dataclass
class Problem:
    """One fault of a dataset: ``severity`` is ``"error"`` (blocks training) or ``"warning"``."""

    severity: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper()} {self.path}: {self.message}"


@dataclass
class Case:
    """One case: its image file(s), one per channel (or one holding all channels), and its label."""

    name: str
    images: list[Path]
    label: Path | None = None


@dataclass
class DatasetInfo:
    """What :func:`discover` found; ``problems`` are faults of the file listing (reading comes later)."""

    root: Path
    layout: str
    cases: list[Case] = field(default_factory=list)
    test_cases: list[Case] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    label_kind: str = "semantic"
    channel_names: dict[str, str] = field(default_factory=dict)
    file_ending: str | None = None
    skipped: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def error(self, path, message: str) -> None:
        self.problems.append(Problem("error", str(path), message))

    def warning(self, path, message: str) -> None:
        self.problems.append(Problem("warning", str(path), message))


def discover(root) -> DatasetInfo:
    """Find the cases under ``root`` (a dataset folder, or its ``dataset.json``).

    Raises:
        DataError: ``root`` is missing, holds no known layout, or its ``dataset.json`` is malformed
            (the message names the key).
    """
    root = Path(root)
    if root.name == "dataset.json" and root.is_file():
        root = root.parent
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    spec_path = root / "dataset.json"
    info = DatasetInfo(root=root, layout="msd")
    spec = _read_spec(spec_path, info) if spec_path.is_file() else None
    if spec is not None and ("training" in spec or (root / "imagesTr").is_dir()):
        return _discover_msd(spec_path, spec, info)
    if (root / "images").is_dir():  # folder pairs, with dataset.json (labels, label_kind...) when present
        info.layout = "folders"
        return _discover_folders(info)
    if spec is not None:
        raise DataError(spec_path, "found neither a 'training' list, an imagesTr/ folder nor an images/ folder")
    if (root / "imagesTr").is_dir():
        raise DataError(root, "found imagesTr/ but no dataset.json; an MSD/nnU-Net dataset needs both")
    raise DataError(
        root, "no dataset layout found: expected images/ (+ labels/), or dataset.json with imagesTr/ and labelsTr/"
    )


def to_datalist(cases: list[Case]) -> list[dict]:
    """MONAI datalist entries ``{"image": str | [str, ...], "label": str, "case": name}`` (no label key when
    the case has none); several image files are the channels of one image."""
    items = []
    for case in cases:
        images = [str(p) for p in case.images]
        item = {"image": images[0] if len(images) == 1 else images, "case": case.name}
        if case.label is not None:
            item["label"] = str(case.label)
        items.append(item)
    return items


def _scan(folder: Path, info: DatasetInfo) -> dict[str, Path | None]:
    """Image entries of ``folder`` by name; hidden/non-image entries are skipped. A name found twice (another
    extension) is reported once per extra file and maps to None: that case is left out, already reported."""
    found: dict[str, Path | None] = {}
    first: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not is_image_path(path):
            info.skipped.append(path)
            continue
        if _outside(info.root, path):
            info.error(path, f"resolves outside the dataset folder ({path.resolve()}); not read")
            continue
        name, ext = split_name(path)
        if info.file_ending and ext and ext != info.file_ending:
            info.warning(path, f"ignored: its ending '{ext}' is not dataset.json file_ending '{info.file_ending}'")
        elif name in first:
            info.error(path, f"duplicate case name '{name}' (also {first[name].name})")
            found[name] = None
        else:
            first[name] = found[name] = path
    return found


def _group_channels(images: dict[str, Path | None], info: DatasetInfo, split) -> dict[str, list[Path] | None]:
    """Group ``<case>_0000``-style names (those for which ``split(name, case)`` holds) into cases with their
    channels in order; a case whose files are faulty maps to None once its fault is reported."""
    channels: dict[str, dict[int, Path | None]] = {}
    cases: dict[str, list[Path] | None] = {}
    for name, path in images.items():
        match = _CHANNEL.match(name)
        if match and split(name, match["case"]):
            channels.setdefault(match["case"], {})[int(match["channel"])] = path
        else:
            cases[name] = None if path is None else [path]
    for name, by_index in channels.items():
        files = [by_index[i] for i in sorted(by_index)]
        first = next((f for f in files if f is not None), None)
        if name in cases:
            cases[name] = None
            if first is not None:
                info.error(first, f"case '{name}' has both a single image file and _0000-style channel files")
        elif first is None or None in files:
            cases[name] = None  # a duplicate name, reported by _scan
        elif sorted(by_index) != list(range(len(by_index))):
            missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
            info.error(first, f"case '{name}' lacks channel file(s) {', '.join(f'_{i:04d}' for i in missing)}")
            cases[name] = None
        else:
            cases[name] = files if _channel_count_ok(name, files, info) else None
    return dict(sorted(cases.items()))


def _channel_count_ok(name: str, files: list[Path], info: DatasetInfo) -> bool:
    """``_0000``-style files are one per ``channel_names`` entry (a file may still hold RGB or a 4D stack)."""
    declared = len(info.channel_names)
    if not declared or len(files) == declared or not all(_CHANNEL.match(split_name(f)[0]) for f in files):
        return True
    names = ", ".join(info.channel_names.values())
    info.error(files[0], f"case '{name}' has {len(files)} channel file(s); dataset.json declares {declared} ({names})")
    return False


def _pair(
    images: dict[str, list[Path] | None], labels: dict[str, Path | None] | None, info: DatasetInfo, need: bool
) -> list[Case]:
    """Cases from images and labels by name; unmatched ones are errors when ``need`` (a training split).
    Names mapped to None were reported already and are left out without a second, cascaded problem."""
    cases = []
    for name, files in images.items():
        label = labels.get(name) if labels else None
        if files is None or (labels and name in labels and label is None):
            continue
        if need and labels is not None and label is None:
            info.error(files[0], f"image of case '{name}' has no label")
        cases.append(Case(name, files, label))
    for name, path in (labels or {}).items():
        if path is not None and name not in images:
            info.error(path, f"label of case '{name}' has no image")
    return cases


def _discover_folders(info: DatasetInfo) -> DatasetInfo:
    images = _scan(info.root / "images", info)
    labels = _scan(info.root / "labels", info) if (info.root / "labels").is_dir() else None
    # with labels, "x_0000" is a channel of case "x" only when "x" (and not "x_0000") has a label
    grouped = _group_channels(images, info, lambda name, case: bool(labels) and name not in labels and case in labels)
    info.cases = _pair(grouped, labels, info, need=True)
    return info


def _outside(root: Path, path: Path) -> bool:
    """``path`` (symlinks followed, ``..`` collapsed) is not under ``root``; nothing is opened."""
    return not path.resolve().is_relative_to(root.resolve())


def _skipped_in(folders: list[Path], info: DatasetInfo) -> None:
    """Hidden and non-image entries of the folders a case list points into, listed as a scan would list them."""
    for folder in folders:
        if folder.is_dir():
            info.skipped += [p for p in sorted(folder.iterdir()) if not is_image_path(p)]


def _discover_msd(spec_path: Path, spec: dict, info: DatasetInfo) -> DatasetInfo:
    root = info.root
    if "training" in spec or "test" in spec:
        listed = [k for k in ("training", "test") if k in spec]
        _skipped_in([root / f for k in listed for f in (("imagesTr", "labelsTr") if k == "training"
                                                         else ("imagesTs", "labelsTs"))], info)
    if "training" in spec:
        info.cases = _listed(spec_path, spec, "training", info)
    else:
        info.cases = _scanned(root / "imagesTr", root / "labelsTr", info, need=True)
    if "test" in spec:
        info.test_cases = _listed(spec_path, spec, "test", info)
    elif (root / "imagesTs").is_dir():
        info.test_cases = _scanned(root / "imagesTs", root / "labelsTs", info, need=False)
    declared = spec.get("numTraining")
    errors = any(p.severity == "error" for p in info.problems)  # they already explain missing cases
    if isinstance(declared, int) and declared != len(info.cases) and not errors:
        info.warning(spec_path, f"numTraining is {declared} but {len(info.cases)} training cases were found")
    return info


def _read_spec(spec_path: Path, info: DatasetInfo) -> dict:
    """Parse ``dataset.json`` into ``info`` (labels, channels, ending, label kind); returns the raw dict."""
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(spec_path, f"not readable JSON: {err}") from None
    if not isinstance(spec, dict):
        raise DataError(spec_path, f"expected a JSON object, got {type(spec).__name__}")
    info.labels = _parse_labels(spec_path, spec.get("labels", {}))
    channels = spec.get("channel_names", spec.get("modality", {}))
    key = "channel_names" if "channel_names" in spec else "modality"
    if not isinstance(channels, dict) or not all(isinstance(v, str) for v in channels.values()):
        raise DataError(spec_path, f'{key}: expected an object like {{"0": "CT"}}, got {channels!r}')
    info.channel_names = {str(k): v for k, v in channels.items()}
    ending = spec.get("file_ending")
    if ending is not None and not (isinstance(ending, str) and ending.startswith(".")):
        raise DataError(spec_path, f"file_ending: expected a string like '.nii.gz', got {ending!r}")
    info.file_ending = ending.lower() if ending else None
    info.label_kind = spec.get("label_kind", "semantic")
    if info.label_kind not in LABEL_KINDS:
        raise DataError(spec_path, f"label_kind: expected one of {', '.join(LABEL_KINDS)}, got {info.label_kind!r}")
    for key in ("training", "test"):
        if key in spec and not isinstance(spec[key], list):
            raise DataError(spec_path, f"{key}: expected a list, got {type(spec[key]).__name__}")
    return spec


def _parse_labels(spec_path: Path, labels) -> dict[str, int]:
    """nnU-Net v2 ``{"background": 0}`` or MSD ``{"0": "background"}`` -> ``{name: id}``."""
    if not isinstance(labels, dict):
        raise DataError(spec_path, f"labels: expected an object, got {type(labels).__name__}")
    out: dict[str, int] = {}
    for key, value in labels.items():
        if isinstance(value, str) and str(key).isdigit():  # MSD: id -> name
            out[value] = int(key)
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            out[str(key)] = value
        else:
            raise DataError(
                spec_path,
                f'labels.{key}: expected a non-negative integer id (or MSD\'s "id": "name"), '
                f"got {value!r} (region lists are not supported)",
            )
    return out


def _scanned(image_dir: Path, label_dir: Path, info: DatasetInfo, need: bool) -> list[Case]:
    images = _group_channels(_scan(image_dir, info), info, split=lambda name, case: True)
    labels = _scan(label_dir, info) if label_dir.is_dir() else None
    if labels is None and need:
        info.error(label_dir, "folder not found: training cases need their labels here")
    return _pair(images, labels, info, need)


def _listed(spec_path: Path, spec: dict, key: str, info: DatasetInfo) -> list[Case]:
    """Cases from a ``training``/``test`` list of ``{"image": ..., "label": ...}`` items (or bare image paths)."""
    cases, seen = [], set()
    for i, item in enumerate(spec[key]):
        item = {"image": item} if isinstance(item, str) else item
        listed = item.get("image") if isinstance(item, dict) else None
        listed = [listed] if isinstance(listed, str) else listed
        if not (isinstance(listed, list) and listed and all(isinstance(p, str) for p in listed)):
            raise DataError(spec_path, f'{key}[{i}]: expected {{"image": path, "label": path}}, got {item!r}')
        entries = [(f"{key}[{i}].image", p) for p in listed]
        if isinstance(item.get("label"), str):
            entries.append((f"{key}[{i}].label", item["label"]))
        escaped = [(where, f"{p}'") for where, p in entries if _outside(info.root, info.root / p)]
        files = [f for p in listed for f in _listed_image(info.root / p)] if not escaped else []
        escaped += [(f"{key}[{i}].image", f"{listed[0]}' (channel file '{f.name}')") for f in files
                    if _outside(info.root, f)]
        if escaped:
            where, entry = escaped[0]
            info.error(spec_path, f"{where} '{entry} resolves outside the dataset folder {info.root}; "
                                  "not read (entries must stay under it)")
            continue
        label = info.root / item["label"] if isinstance(item.get("label"), str) else None
        _note_other_endings(files + ([label] if label else []), key, i, info)
        name = split_name(label if label is not None else info.root / listed[0])[0]
        if label is None and len(listed) > 1 and (match := _CHANNEL.match(name)):
            name = match["case"]
        missing = [p for p in files if not p.exists()] + ([label] if label and not label.exists() else [])
        if missing:
            info.error(missing[0], f"listed in dataset.json {key}[{i}] but not found")
            continue
        if name in seen:
            info.error(files[0], f"duplicate case name '{name}' in dataset.json {key}")
            continue
        if not _channel_count_ok(name, files, info):
            continue
        if label is None and key == "training":
            info.error(files[0], f"image of case '{name}' has no label (dataset.json {key}[{i}])")
        seen.add(name)
        cases.append(Case(name, files, label))
    return cases


def _note_other_endings(files: list[Path], key: str, index: int, info: DatasetInfo) -> None:
    """A listed ``x.nii.gz`` with an ``x.nii`` (or ``x.mha``...) beside it: one of them is not what the user
    thinks; both are named, the listed one is used."""
    for path in files:
        stem, ext = split_name(path)
        others = [path.with_name(stem + e) for e in IMAGE_EXTENSIONS if e != ext]
        for other in others:
            if other.exists():
                info.warning(other, f"same case name as {path.name}, listed in dataset.json {key}[{index}]; "
                                    f"{other.name} is not used")


def _listed_image(path: Path) -> list[Path]:
    """A listed image, or its ``_0000``, ``_0001``... channel files when the listed path itself is absent
    (nnU-Net v1 lists ``imagesTr/x.nii.gz`` for ``imagesTr/x_0000.nii.gz``...)."""
    if path.exists():
        return [path]
    stem, ext = split_name(path)
    channels = []
    while (candidate := path.with_name(f"{stem}_{len(channels):04d}{ext}")).exists():
        channels.append(candidate)
    return channels or [path]
