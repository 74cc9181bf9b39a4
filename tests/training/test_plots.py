"""The training/ package's layout: the loss-curve plot reads the history without the training loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def test_plotting_imports_the_history_without_the_training_loop() -> None:
    code = (
        "import sys; import lofit.training.plots, lofit.training.history; "
        "loaded = [m for m in ('lofit.training.loop', 'accelerate') if m in sys.modules]; "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)}, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()[-2000:]


def test_the_training_package_lists_only_names_it_has() -> None:
    from lofit import training

    assert set(training.__all__) <= set(dir(training)) | set(training._LAZY)
