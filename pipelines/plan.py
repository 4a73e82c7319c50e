"""``medseg plan DATASET``: fingerprint the dataset, plan an experiment for this machine, write the YAML."""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path

from medseg.config import load_config
from medseg.errors import ConfigError, DataError
from medseg.planning.fingerprint import fingerprint_dataset
from medseg.planning.planner import plan_experiment
from medseg.planning.probe import StepProbe
from medseg.planning.render import plan_yaml, table

log = logging.getLogger(__name__)


def _fingerprint_path(root: Path, out: Path | None) -> Path:
    """Beside the dataset when it is writable, else beside the config written."""
    if (root / "fingerprint.json").exists() or _writable(root):
        return root / "fingerprint.json"
    return (out.parent if out else Path.cwd()) / f"{root.name}.fingerprint.json"


def _writable(folder: Path) -> bool:
    probe = folder / ".medseg-write-test"
    try:
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def run_plan_cli(args: argparse.Namespace) -> int:
    root = Path(args.dataset)
    if not root.is_dir():
        raise DataError(root, "not a dataset folder (expected images/ + labels/ or a dataset.json)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device", "cuda was asked for but no CUDA device is available")
    if args.hours is not None and args.hours <= 0:
        raise ConfigError("--hours", f"expected a positive number of hours, got {args.hours}")
    fp_path = _fingerprint_path(root, args.out)
    fingerprint, reused = fingerprint_dataset(root, fp_path)
    log.info("fingerprint %s %s", "reused from" if reused else "written to", fp_path)
    plan = plan_experiment(fingerprint, str(root), device=args.device, memory_gb=args.memory, hours=args.hours,
                           model=args.model, probe=StepProbe(args.device))
    sys.stdout.write(table(plan.summary))
    header = [
        f"Planned by `medseg plan {root}` on {datetime.date.today()} ({args.device}); fingerprint {fp_path}",
        f"(digest {fingerprint.digest[:12]}). Each derived value's comment says where it came from; edit freely.",
    ]
    text = plan_yaml(plan.raw, plan.notes, header)
    if args.dry_run or args.out is None:
        if args.dry_run:
            sys.stdout.write("\n" + text)
        else:
            sys.stdout.write("\n" + text + "\n(give --out CONFIG.yaml to write it)\n")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    load_config(args.out)  # what was written validates as is
    print(f"wrote {args.out} (train it: medseg train {args.out})")
    return 0
