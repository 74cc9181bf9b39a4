"""The training/ package's layout: plotting reads the history without the loop, and the old module names
still give the same objects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parent.parent / "src"


def test_plotting_imports_the_history_without_the_training_loop() -> None:
    code = (
        "import sys; import lofit.plotting, lofit.training.history; "
        "loaded = [m for m in ('lofit.training.loop', 'lofit.trainer', 'accelerate') if m in sys.modules]; "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)}, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()[-2000:]


def test_old_module_names_give_the_same_objects() -> None:
    import lofit.layer_checkpointing
    import lofit.objectives
    import lofit.trainer
    from lofit import training
    from lofit.training import activation_checkpointing, checkpoints, loop, losses, scoring, step

    assert lofit.trainer.train_adapter is loop.train_adapter is training.train_adapter
    assert lofit.trainer.NonFiniteLossError is step.NonFiniteLossError
    assert lofit.trainer.save_checkpoint is checkpoints.save_checkpoint
    assert lofit.objectives.TokenScorer is scoring.TokenScorer is training.TokenScorer
    assert lofit.objectives.DPOObjective is losses.DPOObjective
    assert lofit.layer_checkpointing.checkpointing is activation_checkpointing.checkpointing
    assert set(training.__all__) <= set(dir(training)) | set(training._LAZY)
