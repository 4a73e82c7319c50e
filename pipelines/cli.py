"""The ``medseg`` command line: thin argument parsing over the workflows in :mod:`pipelines`.

Run as the ``medseg`` console script or as ``python -m pipelines`` (:mod:`pipelines.__main__`).

Heavy imports (torch, MONAI, MLflow) happen inside each command so ``medseg --help`` stays fast. A user error
(a bad file, config key or argument) prints one clear line per problem and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

EXAMPLES = """\
examples:
  medseg synth cells --out demo/cells --n 24 --n-test 4
  medseg check demo/cells
  medseg plan demo/cells --out configs/planned_cells.yaml --hours 2
  medseg train configs/demo_cells.yaml --set train.epochs=5
  medseg predict --model runs/demo_cells --input demo/cells/imagesTs --output demo/pred --instances
  medseg evaluate --pred demo/pred --ref demo/cells/labelsTs
  medseg export --model runs/demo_cells --format onnx --out demo/export
  mlflow ui --backend-store-uri sqlite:///mlflow.db
"""


def _add_tracking(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)",
    )
    g.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Medical-image segmentation on MONAI and PyTorch: cells and lesions, 2D and 3D, tracked in MLflow.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_synth(sub)
    _add_check(sub)
    _add_plan(sub)
    _add_train(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_cv(sub)
    _add_export(sub)
    _add_augment_preview(sub)
    _add_config(sub)
    return parser


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate a synthetic dataset (cells or lesions)")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    c = kinds.add_parser("cells", help="2D fluorescence-like nuclei with instance labels (16-bit TIFF)")
    c.add_argument("--out", required=True, type=Path, help="output dataset folder")
    c.add_argument("--n", type=int, default=8, help="number of training cases (default 8)")
    c.add_argument("--n-test", type=int, default=0, help="held-out cases with labels, in imagesTs/labelsTs")
    c.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("X", "Y"),
                   help="image width and height in pixels (default 256 256)")
    c.add_argument("--clusters", type=float, default=0.5, metavar="FRACTION",
                   help="fraction of the nuclei in clusters of touching nuclei with no background between them, "
                        "the case that merges instances (default 0.5; 0 = every nucleus isolated)")
    c.add_argument("--cluster-size", type=int, nargs=2, default=[2, 5], metavar=("MIN", "MAX"),
                   help="nuclei per cluster, smaller clusters commoner (default 2 5)")
    c.add_argument("--seed", type=int, default=0)
    le = kinds.add_parser("lesions", help="3D NIfTI lesion volumes (or 2D RGB with --dims 2), semantic labels")
    le.add_argument("--out", required=True, type=Path, help="output dataset folder")
    le.add_argument("--n", type=int, default=6, help="number of training cases (default 6)")
    le.add_argument("--n-test", type=int, default=0, help="held-out cases with labels, in imagesTs/labelsTs")
    le.add_argument("--size", type=int, nargs="+", default=None, metavar="N",
                    help="X Y Z for 3D (default 96 96 32), X Y for 2D (default 192 192), in voxels")
    le.add_argument("--dims", type=int, choices=(2, 3), default=3)
    le.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="3D voxel size in mm (default 0.8 0.8 2.5; e.g. 0.8 0.8 4 for thick slices)")
    le.add_argument("--seed", type=int, default=0)


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="dataset integrity report (exit 1 when a problem is fatal)")
    p.add_argument("target", help="a dataset folder, or an experiment config (its data.root is checked)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tolerance", type=float, default=1e-3, help="geometry tolerance (default 1e-3)")


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="derive an experiment config from a dataset and this machine (spacing, normalisation, network, "
             "patch, batch, schedule), each value commented with where it came from",
        description="Fingerprint DATASET (cached in fingerprint.json while its content is unchanged), measure "
                    "training steps of the network on this machine, and write a config that trains as is.",
    )
    p.add_argument("dataset", type=Path, help="dataset folder (images/ + labels/, or an nnU-Net/MSD dataset.json)")
    p.add_argument("--out", type=Path, default=None, help="config YAML to write (default: print only)")
    p.add_argument("--memory", type=float, default=None, metavar="GB",
                   help="memory one training step may use (default: 85%% of the GPU, or 25%% of free RAM on cpu)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to plan (and measure) for")
    p.add_argument("--hours", type=float, default=None, metavar="H",
                   help="training time budget: epochs from it and the measured step time (default: nnU-Net's 1000)")
    p.add_argument("--model", choices=("unet", "unetpp", "segnet"), default="unet", help="network (default unet)")
    p.add_argument("--dry-run", action="store_true", help="print the table and the YAML, write no config")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a network from an experiment config; logs the run to MLflow")
    p.add_argument("config", type=Path, help="experiment YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue from the output folder's last checkpoint (auto) or a checkpoint file")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="overrides train.device")
    p.add_argument("--output", type=Path, default=None, help="run folder (overrides experiment.output_dir)")
    p.add_argument("--fold", type=int, default=None, metavar="K",
                   help="train cross-validation fold K of data.folds (run folder <output>/fold_K; splits.json)")
    _add_tracking(p)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="batch-predict a folder (or files) of scans with a trained model")
    p.add_argument("--model", required=True, nargs="+", metavar="MODEL",
                   help="checkpoint file, training output folder, export folder (medseg export), runs:/<id>/model "
                        "or models:/<name>/<version>; several: an ensemble averaging their probabilities (e.g. the "
                        "cross-validation folds)")
    p.add_argument("--input", required=True, nargs="+", help="a folder of scans, or scan files")
    p.add_argument("--output", required=True, type=Path, help="output folder")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average over all mirrorings (slower, often better); default: the model's inference.tta")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap in [0, 1) (default: model's)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass (default: model's)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                   help="autocast precision; auto: bf16 where the hardware has it (CPUs with AVX512-BF16 or AMX, "
                        "Ampere+ GPUs), fp16 on older GPUs, else fp32 (default: the model's inference.precision)")
    p.add_argument("--compression-level", type=int, default=None, metavar="0-9",
                   help="zlib level of the written maps (.nii.gz, compressed .mha/.nrrd, .tif, .png) and "
                        "probabilities (.npz): 0 stores (fastest), 9 is smallest (default: the format's, .nii.gz 1, "
                        ".npz 6)")
    p.add_argument("--save-probabilities", action="store_true", help="also write float16 class probabilities")
    p.add_argument("--instances", action="store_true",
                   help="also write instance maps (<case>_instances), split by the model's instance representation "
                        "(border, distance or flows) with the thresholds tuned at the end of its training")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a post-processing setting: instances.postprocess.<threshold>=<value> (border: "
                        "foreground; distance: foreground, marker; flows: foreground, slope, marker_size) or "
                        "inference.min_instance_size=<pixels>")
    p.add_argument("--skip-existing", action="store_true", help="skip cases whose output already exists")
    p.add_argument("--nonfinite", choices=("error", "replace"), default="error",
                   help="scans with NaN/Inf voxels: fail the case (default), or replace NaN and -Inf by the scan's "
                        "lowest finite value and +Inf by its highest (recorded as a warning in the manifest)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI for runs:/ and models:/ models")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="compare predictions with reference labels (Dice, HD95, AP, ...)")
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted label maps")
    p.add_argument("--ref", required=True, type=Path, help="folder of reference label maps")
    p.add_argument("--instances", action="store_true", help="instance metrics (AP@0.5:0.95, F1, PQ)")
    p.add_argument("--out", type=Path, default=None, help="where metrics.csv/summary.json go (default: --pred)")
    p.add_argument("--tolerance", type=float, default=1.0, help="surface Dice tolerance in mm/px (default 1)")
    p.add_argument("--run-id", default=None, help="log the summary into this MLflow run")
    _add_tracking(p)


def _add_cv(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cv", help="cross-validation summary over the fold runs of an experiment")
    p.add_argument("runs", type=Path, metavar="RUNS_OR_CONFIG",
                   help="the experiment's run folder holding fold_0 .. fold_K-1, or its config file (its "
                        "experiment.output_dir is the run folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for train (only with a config file)")
    _add_tracking(p)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained network to ONNX or TorchScript (checked against torch)")
    p.add_argument("--model", required=True,
                   help="checkpoint file, training output folder, runs:/<id>/model or models:/<name>/<version>")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"), help="onnx (onnxruntime) or "
                   "torchscript (torch.jit.load)")
    p.add_argument("--out", required=True, type=Path, help="export folder: the network + medseg-model.json")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed difference to torch's logits on a random input (default 1e-4)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI for runs:/ and models:/ models")


def _add_augment_preview(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("augment-preview", help="PNG grid of augmented training samples with label overlays")
    p.add_argument("config", type=Path)
    p.add_argument("--out", required=True, type=Path, help="output PNG")
    p.add_argument("--n", type=int, default=8, help="number of augmented samples (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="validate a config as train does (network parameters included) and print it "
                                      "resolved (all defaults filled in)")
    p.add_argument("config", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _run(args: argparse.Namespace) -> int:
    if args.command == "synth":
        from pipelines.synth import run_synth

        return run_synth(args)
    if args.command == "check":
        from pipelines.check import run_check

        return run_check(args.target, args.overrides, args.tolerance)
    if args.command == "config":
        from medseg.config import dump_config
        from pipelines.common import load_experiment

        sys.stdout.write(dump_config(load_experiment(args.config, args.overrides)))
        return 0
    if args.command == "plan":
        from pipelines.plan import run_plan_cli

        return run_plan_cli(args)
    if args.command == "train":
        from pipelines.train import run_train_cli

        return run_train_cli(args)
    if args.command == "predict":
        from pipelines.predict import run_predict_cli

        return run_predict_cli(args)
    if args.command == "evaluate":
        from pipelines.evaluate import run_evaluate_cli

        return run_evaluate_cli(args)
    if args.command == "cv":
        from pipelines.cv import run_cv_cli

        return run_cv_cli(args)
    if args.command == "export":
        from pipelines.export import run_export_cli

        return run_export_cli(args)
    if args.command == "augment-preview":
        from pipelines.preview import run_preview_cli

        return run_preview_cli(args)
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from medseg.errors import find_cause

    try:
        return _run(args)
    except Exception as err:
        cause = find_cause(err)  # also the user error behind a wrapper (MONAI's "applying transform ...")
        if cause is None:
            raise
        for line in str(cause).splitlines():
            print(f"medseg {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130

