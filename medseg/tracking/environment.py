"""Software a run used, as MLflow tags: package versions, user and the git commit of the work tree."""

from __future__ import annotations

import contextlib
import getpass
import platform
import subprocess
from importlib import metadata as dist_metadata

from medseg import __version__


def environment_tags() -> dict[str, str]:
    """Tags describing the software a run used: versions, user and, inside a git work tree, the commit.

    The commit goes to MLflow's own ``mlflow.source.git.commit`` key, which the UI shows with the run;
    ``medseg.git.dirty`` says whether the work tree had uncommitted changes.
    """
    import torch

    tags = {"medseg.version": __version__, "python.version": platform.python_version()}
    for dist in ("monai", "mlflow"):
        with contextlib.suppress(dist_metadata.PackageNotFoundError):
            tags[f"{dist}.version"] = dist_metadata.version(dist)
    # The build, with its local version (2.13.0+cu130, 2.13.0+cpu), which a CUDA wheel's metadata omits.
    tags["torch.version"] = torch.__version__
    with contextlib.suppress(OSError, KeyError):  # no login name in some containers
        tags["mlflow.user"] = getpass.getuser()
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["medseg.git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    return tags



def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
