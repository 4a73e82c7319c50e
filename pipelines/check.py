"""`medseg check`: a dataset integrity report before anyone trains."""

from __future__ import annotations

from pathlib import Path

from medseg.data.check import check_dataset


def resolve_dataset_root(target: str | Path, overrides: list[str]) -> Path:
    """A dataset folder as given, or the ``data.root`` of an experiment config."""
    path = Path(target)
    if path.suffix.lower() in (".yaml", ".yml"):
        from medseg.config import load_config

        return Path(load_config(path, overrides).data.root)
    return path


def run_check(target: str | Path, overrides: list[str], tolerance: float) -> int:
    root = resolve_dataset_root(target, overrides)
    report = check_dataset(root, geometry_tol=tolerance)
    for line in report.lines():
        print(line)
    n_err = sum(p.severity == "error" for p in report.problems)
    n_warn = len(report.problems) - n_err
    print(
        f"{root}: {report.n_cases} cases, {n_err} errors, {n_warn} warnings, {len(report.skipped)} files skipped"
        + (" -> NOT ready to train" if report.fatal else " -> ok")
    )
    return 1 if report.fatal else 0
