"""`medseg predict`: batch prediction of a folder of scans with a trained model.

A folder is a batch: hidden and non-image files are skipped (and listed), one bad scan fails alone while the
others are written, every output is written atomically (so ``--skip-existing`` after a kill redoes exactly the
missing ones), and a manifest (JSON + CSV) records every case. Reading the next scan and writing the last one
overlap with computing the current one. Under ``torchrun`` the cases are sharded across processes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shutil
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.data.readers import IMAGE_EXTENSIONS, is_hidden, is_image_path, split_name
from medseg.data.writers import write_image
from medseg.engine import distributed as dist
from medseg.ensemble import ProbabilityEnsemble, check_members
from medseg.errors import ConfigError, DataError, find_cause
from medseg.export import ExportedNetwork, is_export_folder, load_exported
from medseg.predictor import CasePredictor, load_model_file
from pipelines.common import ensure_writable
from pipelines.progress import Progress

log = logging.getLogger("medseg.predict")


@dataclass
class CaseRecord:
    case: str
    input: str
    output: str
    shape: str = ""
    seconds: float = 0.0
    status: str = "pending"  # ok | skipped | failed
    error: str = ""
    warning: str = ""  # e.g. non-finite voxels replaced (--nonfinite replace)


def load_trained_model(source: str, tracking_uri: str | None = None, device: str | torch.device = "cpu",
                       ) -> tuple[torch.nn.Module | ExportedNetwork, dict[str, Any]]:
    """A trained model and the metadata prediction needs, from any of the places a model can be.

    Args:
        source: a checkpoint file, a training output folder (its ``checkpoints/best.pt``, else ``last.pt``),
            an export folder (``medseg export``: the network runs through onnxruntime or TorchScript),
            ``runs:/<run_id>/model`` or ``models:/<name>/<version>``.
        device: where an exported TorchScript network runs (torch networks are moved by the predictor).
    """
    if is_export_folder(Path(source)):
        return load_exported(Path(source), device)
    if source.startswith(("runs:/", "models:/")):
        from medseg.tracking import load_model

        model, meta = load_model(source, tracking_uri=tracking_uri)
        return model.eval(), meta
    path = Path(source)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                path = path / "checkpoints" / name
                break
        else:
            raise DataError(path, "no checkpoints/best.pt or checkpoints/last.pt in this folder (a training output?)")
    if not path.is_file():
        raise DataError(path, "model not found: expected a checkpoint, a run folder, runs:/<id>/model or models:/...")
    return load_model_file(path)


def load_models(sources: str | list[str], tracking_uri: str | None = None, device: str | torch.device = "cpu",
                ) -> tuple[torch.nn.Module | ExportedNetwork, dict[str, Any]]:
    """One model, or several as a :class:`~medseg.ensemble.ProbabilityEnsemble` that averages probabilities.

    Members must agree on classes and preprocessing (a ConfigError names the first that does not); the
    sliding window uses the first member's patch size and inference settings.
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    loaded = [load_trained_model(s, tracking_uri, device) for s in sources]
    if len(loaded) == 1:
        return loaded[0]
    metas = [meta for _, meta in loaded]
    check_members(metas, sources)
    log.info("ensemble of %d models: probabilities averaged before post-processing", len(loaded))
    ensemble = ProbabilityEnsemble([model for model, _ in loaded], len(metas[0]["classes"]))
    return ensemble.eval(), {**metas[0], "ensemble": sources}


def list_inputs(inputs: list[str]) -> tuple[list[Path], list[Path]]:
    """Scan files to predict and files skipped (hidden, not an image), from folders and/or files."""
    files, skipped = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for child in sorted(path.iterdir()):
                (files if not is_hidden(child) and is_image_path(child) else skipped).append(child)
        elif path.exists():
            files.append(path)
        else:
            raise DataError(path, "input does not exist")
    return files, skipped


def output_path(scan: Path, out_dir: Path, suffix: str = "") -> Path:
    """``case_0000.nii.gz`` -> ``out/case.nii.gz``: same format, nnU-Net's channel suffix dropped."""
    stem, ext = split_name(scan)
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        stem = stem[:-5]
    return out_dir / f"{stem}{suffix}{ext if ext else '.nii.gz'}"


Predictor = CasePredictor  # the per-case engine lives in medseg.predictor (shared with the MLflow pyfunc)
# Results computed but not yet written: where writing is slower than computing (e.g. with probabilities) the
# computing waits instead of piling up whole-volume results in memory.
MAX_PENDING_WRITES = 2


def predict_batch(
    model: torch.nn.Module, meta: dict[str, Any], scans: list[Path], out_dir: Path, *, device: torch.device,
    tta: bool | None = None, overlap: float | None = None, sw_batch_size: int | None = None, instances: bool = False,
    probabilities: bool = False, skip_existing: bool = False, show_progress: bool = True, nonfinite: str = "error",
    overrides: list[str] | None = None, precision: str | None = None, compression_level: int | None = None,
) -> list[CaseRecord]:
    """Predict ``scans`` into ``out_dir``; never raises for one bad scan: its record says what went wrong.

    ``tta``, ``overlap``, ``sw_batch_size`` and ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``) left at
    None take the model's ``inference`` settings. A scan with
    NaN/Inf voxels fails unless ``nonfinite="replace"`` (then its record carries a warning); one with a
    degenerate affine or the wrong channel count fails when loaded, before any compute.
    ``overrides``: ``KEY=VALUE`` post-processing settings (see :class:`medseg.predictor.CasePredictor`).
    ``compression_level``: zlib level 0-9 of the written label and instance maps and probabilities (None: the
    format's default). At most ``MAX_PENDING_WRITES`` computed cases wait for the writer.
    """
    engine = CasePredictor(model, meta, device=device, tta=tta, overlap=overlap, sw_batch_size=sw_batch_size,
                           instances=instances, probabilities=probabilities, nonfinite=nonfinite,
                           overrides=overrides, precision=precision)
    records = [CaseRecord(output_path(s, out_dir).name.split(".")[0], str(s), str(output_path(s, out_dir)))
               for s in scans]
    todo = []
    for rec in records:
        if skip_existing and Path(rec.output).is_file() and (
            not instances or output_path(Path(rec.input), out_dir, "_instances").is_file()
        ):
            rec.status = "skipped"
        else:
            todo.append(rec)
    progress = Progress("predict", len(todo), enabled=show_progress, lines=10, unit="case")
    with ThreadPoolExecutor(1, thread_name_prefix="read") as reader, ThreadPoolExecutor(1, "write") as writer:
        pending: list[tuple[CaseRecord, Future]] = []
        loads = {id(r): reader.submit(engine.load, Path(r.input)) for r in todo[:1]}
        for i, rec in enumerate(todo):
            if i + 1 < len(todo):  # read the next scan while this one computes
                nxt = todo[i + 1]
                loads[id(nxt)] = reader.submit(engine.load, Path(nxt.input))
            start = time.perf_counter()
            try:
                data = loads.pop(id(rec)).result()
                rec.shape = "x".join(map(str, data["image"].shape[1:]))
                rec.warning = "; ".join(data.get("warnings", []))
                if rec.warning:
                    log.warning("%s", rec.warning)
                if i == 0:
                    est = engine.window.estimate_memory(list(data["image"].shape))
                    log.info("memory estimate for %s: %.1f MiB", rec.case, est.get("total", 0) / 2**20)
                result = engine.compute(data)
                unfinished = [f for _, f in pending if not f.done()]
                if len(unfinished) >= MAX_PENDING_WRITES:
                    wait(unfinished[:1])  # the oldest; its outcome is read below
                pending.append((rec, writer.submit(write_case, rec, result, out_dir, compression_level)))
            except Exception as err:  # one bad scan must not stop the batch
                rec.status, rec.error = "failed", _reason(err)
                log.error("%s: %s", rec.input, rec.error)
            rec.seconds = round(time.perf_counter() - start, 3)
            progress.update(i)
        for rec, fut in pending:
            try:
                fut.result()
                rec.status = "ok"
            except Exception as err:
                rec.status, rec.error = "failed", _reason(err)
                log.error("%s: %s", rec.input, rec.error)
    progress.close()
    return records


def _reason(err: Exception) -> str:
    cause = find_cause(err)  # the user-facing error behind MONAI's "applying transform <...>" wrapper
    return str(cause) if cause is not None else f"{type(err).__name__}: {err}"


def write_case(rec: CaseRecord, result: dict[str, Any], out_dir: Path, level: int | None = None) -> None:
    """Write one computed case into ``out_dir``: instances, probabilities, then the label map (its presence
    means done), each atomically; ``level`` is the zlib level."""
    scan, meta = Path(rec.input), result["meta"]
    if "instances" in result:
        inst = result["instances"]
        dtype = np.uint16 if inst.max(initial=0) < 65536 else np.uint32
        write_image(inst.astype(dtype), output_path(scan, out_dir, "_instances"), meta=meta, compression_level=level)
    if "probabilities" in result:
        buffer = io.BytesIO()
        arrays = {"probabilities": result["probabilities"]}
        if "regression" in result:  # an instance representation's distance or flow maps
            arrays["regression"] = result["regression"]
        savez_compressed(buffer, arrays, level)
        _atomic_bytes(out_dir / f"{rec.case}_probabilities.npz", buffer.getvalue())
    # written last: its presence means "done"
    write_image(result["labels"], Path(rec.output), meta=meta, compression_level=level)


def savez_compressed(file, arrays: dict[str, np.ndarray], level: int | None = None) -> None:
    """``np.savez_compressed`` at zlib ``level`` 0-9 (None: zlib's default, 6, as numpy's); ``np.load`` reads it."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _atomic_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to a hidden ``.<name>.<pid>.tmp`` beside ``target``, then rename it over ``target``."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(out_dir: Path) -> None:
    """What the writes of a killed run left behind, and nothing else: the hidden ``.<name>.<token>.tmp``
    folders of image writes, the hidden ``.<name>.<pid>.tmp`` files of probabilities and manifests, and the
    ``<case>_probabilities.tmp.npz`` files of earlier versions. Other files, hidden or not, stay."""
    if not out_dir.is_dir():
        return
    for tmp in [*out_dir.glob(".*.tmp"), *out_dir.glob("*_probabilities.tmp.npz")]:
        name = tmp.name
        ours = name.endswith("_probabilities.tmp.npz") or (
            tmp.is_dir() and split_name(name[1:].rsplit(".", 2)[0])[1] in IMAGE_EXTENSIONS
        ) or (tmp.is_file() and name[1:].rsplit(".", 2)[0].endswith(("_probabilities.npz", ".json", ".csv")))
        if not ours:
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted run", tmp)


def write_manifest(records: list[CaseRecord], out_dir: Path, skipped_inputs: list[Path], name: str) -> Path:
    rows = [asdict(r) for r in records]
    document = {"cases": rows, "skipped_inputs": [str(p) for p in skipped_inputs]}
    _atomic_bytes(out_dir / f"{name}.json", json.dumps(document, indent=2).encode())
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else list(CaseRecord.__annotations__))
    writer.writeheader()
    writer.writerows(rows)
    _atomic_bytes(out_dir / f"{name}.csv", table.getvalue().encode())
    return out_dir / f"{name}.json"


def run_predict_cli(args: argparse.Namespace) -> int:
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise ConfigError("--overlap", f"expected a value in [0, 1), got {args.overlap}")
    if args.compression_level is not None and not 0 <= args.compression_level <= 9:
        raise ConfigError("--compression-level", f"expected 0 (stored) to 9 (smallest), got {args.compression_level}")
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        raise ConfigError("--sw-batch-size", f"expected a positive integer, got {args.sw_batch_size}")
    dist_info = dist.init_distributed(args.device)
    if dist_info.device.type == "cpu":
        torch.set_flush_denormal(True)  # see pipelines/train.py
    try:
        if dist_info.is_main:
            ensure_writable(args.output, "--output")  # before any compute, not on the manifest at the end
        model, meta = load_models(args.model, args.tracking_uri, dist_info.device)
        scans, skipped = list_inputs(args.input)
        if dist_info.is_main:
            for path in skipped:
                print(f"skipped (hidden or not an image): {path}")
        if not scans:
            raise DataError(", ".join(args.input), "no scans to predict")
        if dist_info.is_main:
            remove_stale_temporaries(args.output)
        dist.barrier(dist_info)
        mine = dist.shard(scans, dist_info)
        records = predict_batch(
            model, meta, mine, args.output, device=dist_info.device, tta=args.tta, overlap=args.overlap,
            sw_batch_size=args.sw_batch_size, instances=args.instances, probabilities=args.save_probabilities,
            skip_existing=args.skip_existing, show_progress=dist_info.is_main, nonfinite=args.nonfinite,
            overrides=args.overrides, precision=args.precision, compression_level=args.compression_level,
        )
        name = "manifest" if not dist_info.enabled else f"manifest_rank{dist_info.rank}"
        write_manifest(records, args.output, skipped if dist_info.is_main else [], name)
        failed = [r for r in records if r.status == "failed"]
        done = sum(r.status == "ok" for r in records)
        print(f"predicted {done}, skipped {sum(r.status == 'skipped' for r in records)}, failed {len(failed)}"
              f" -> {args.output}")
        for r in failed:
            print(f"FAILED {r.input}: {r.error}")
        failed_any = dist.all_reduce_mean(float(bool(failed)), dist_info) > 0
        return 1 if failed_any else 0
    finally:
        dist.cleanup_distributed()
