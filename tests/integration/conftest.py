import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MEDSEG = shutil.which("medseg", path=str(Path(sys.executable).parent)) or "medseg"


def run_medseg(*args, cwd=None, env=None, check=True, timeout=600):
    """Run the real `medseg` console script in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [MEDSEG, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, encoding="utf-8",
        errors="replace", timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"medseg {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def medseg():
    return run_medseg
