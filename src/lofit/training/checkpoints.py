"""Training checkpoints: all a run needs to continue exactly, written atomically, read without pickle.

A checkpoint is a directory `step-00000012/` inside the run's checkpoint directory holding
- `state.safetensors`: the adapter's trainable tensors, the optimizer's tensors (AdamW moments, step
  counts) and the random-number states (torch CPU/CUDA, numpy, the data-order generator);
- `state.json`: format and version, the run's identity (training options, data hash, heads, parameter
  shapes), the loop position (epoch, batches done, optimizer steps), the scheduler state, the optimizer's
  hyper-parameters, Python's random state and the training history so far.

It is filled in a hidden temporary directory beside its final name and renamed into place, so a crash at
any moment (SIGKILL included) leaves either the complete checkpoint or none; older checkpoints are removed
only after the new one is in place. Resuming refuses a checkpoint from a run with other options or data.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import LofitValueError
from ..io.atomic import atomic_directory, remove_folder, remove_leftovers

FORMAT_NAME = "lofit-training-checkpoint"
FORMAT_VERSION = 1
TENSORS_NAME = "state.safetensors"
STATE_NAME = "state.json"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")


class CheckpointError(LofitValueError):
    """A checkpoint cannot be read or does not belong to this run; the message says what to change."""


@dataclass
class LoopPosition:
    """Where the training loop stands: continue with batch `batch` of epoch `epoch` (both 1-based epochs,
    0-based batches); `generator_state` is the data-order generator at the start of that epoch."""

    step: int
    epoch: int
    batch: int
    generator_state: torch.Tensor
    tokens_seen: int = 0
    elapsed_s: float = 0.0


@dataclass
class Checkpoint:
    """A checkpoint read back from disk (validated), ready to `restore` into a run."""

    path: Path
    position: LoopPosition
    identity: dict[str, Any]
    history: dict[str, Any]
    document: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def check_identity(self, identity: dict[str, Any]) -> None:
        """Raise CheckpointError naming the first option/data field that differs from this run's."""
        saved = json.loads(json.dumps(self.identity))
        current = json.loads(json.dumps(identity))  # compare as written: tuples are lists in JSON
        for key in sorted(set(saved) | set(current)):
            if saved.get(key) != current.get(key):
                shown_saved, shown_current = _short(saved.get(key)), _short(current.get(key))
                raise CheckpointError(
                    f"{self.path}: this checkpoint was written by a run with {key}={shown_saved}, but this run "
                    f"has {key}={shown_current}; resume with the same options and data, or delete "
                    f"{self.path.parent} (or use another output directory) to start afresh"
                )

    def restore(
        self,
        identity: dict[str, Any],
        params: Sequence[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> LoopPosition:
        """Check the identity, then load parameters, optimizer, scheduler and RNG states; return the position."""
        self.check_identity(identity)
        with torch.no_grad():
            for index, param in enumerate(params):
                value = self._tensor(f"param.{index}")
                if value.shape != param.shape:
                    raise CheckpointError(
                        f"{self.path / TENSORS_NAME}: param.{index} has shape {tuple(value.shape)}, expected "
                        f"{tuple(param.shape)}"
                    )
                param.copy_(value.to(param))
        optimizer.load_state_dict(self._optimizer_state(optimizer))
        scheduler.load_state_dict(
            {**self.document["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)}
        )
        restore_rng(self.tensors, self.document["rng"])
        return self.position

    def _tensor(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise CheckpointError(
                f"{self.path / TENSORS_NAME}: tensor {key!r} is missing; the file is corrupt"
            )
        return self.tensors[key]

    def _optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        saved = self.document["optimizer"]
        groups = []
        for current, group in zip(optimizer.param_groups, saved["param_groups"], strict=False):
            # JSON turned tuples (AdamW's betas) into lists; give them back their type.
            groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in group.items()})
        if len(groups) != len(optimizer.param_groups):
            raise CheckpointError(f"{self.path / STATE_NAME}: optimizer has the wrong number of groups")
        state: dict[int, dict[str, Any]] = {}
        for index_text, entries in saved["state"].items():
            index = int(index_text)
            state[index] = {
                key: self._tensor(f"optimizer.{index}.{key}") if value is None else value
                for key, value in entries.items()
            }
        return {"state": state, "param_groups": groups}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------------ RNG states
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every global random-number state as (tensors, JSON-able values)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    values = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": cached},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return tensors, values


def restore_rng(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    """Set every global random-number state back to what `capture_rng` recorded."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors, key=_natural) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    numpy = values["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            tensors["rng.numpy"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    python = values["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))


def _natural(key: str) -> tuple[str, int]:
    prefix, _, number = key.rpartition(".")
    return prefix, int(number) if number.isdigit() else -1


# ------------------------------------------------------------------------------------------ save
def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint after `step` optimizer steps.

    Example:
        >>> checkpoint_name(12)
        'step-00000012'
    """
    return f"step-{step:08d}"


def save_checkpoint(
    directory: str | os.PathLike[str],
    position: LoopPosition,
    *,
    params: Sequence[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    identity: dict[str, Any],
    history: dict[str, Any],
) -> Path:
    """Write a checkpoint for `position` atomically into `directory`; remove older ones.

    Args:
        directory: the run's checkpoint directory (created if needed).
        position: where the loop stands.
        params: the adapter's trainable parameters, in the loop's order.
        optimizer: the AdamW optimizer over `params`.
        scheduler: its learning-rate schedule.
        identity: what a resuming run must agree on (options, data hash, heads, shapes).
        history: the training history so far, as a dict.

    Returns:
        The path of the new `step-XXXXXXXX` directory.
    """
    root = Path(directory)
    tensors = _parameter_tensors(params, position.step)
    optimizer_document = _optimizer_document(optimizer.state_dict(), tensors)
    rng_tensors, rng_values = capture_rng()
    tensors.update(rng_tensors)
    tensors["data.generator"] = position.generator_state
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "position": {
            "step": position.step,
            "epoch": position.epoch,
            "batch": position.batch,
            "tokens_seen": position.tokens_seen,
            "elapsed_s": position.elapsed_s,
        },
        "identity": identity,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "optimizer": optimizer_document,
        "rng": rng_values,
        "history": history,
    }
    text = json.dumps(document, indent=1) + "\n"  # fails here (TypeError), before any file is touched
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    target = root / checkpoint_name(position.step)
    _remove_stale_temporaries(root)
    with atomic_directory(target) as tmp:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": FORMAT_NAME})
        (tmp / STATE_NAME).write_text(text, encoding="utf-8")
    for older in list_checkpoints(root):
        if older != target:
            remove_checkpoint(older)
    return target


def _parameter_tensors(params: Sequence[nn.Parameter], step: int) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for index, param in enumerate(params):
        value = param.detach().float().cpu()
        if not torch.isfinite(value).all():
            raise CheckpointError(
                f"adapter parameter {index} holds NaN/inf at step {step}; no checkpoint written "
                "(the previous one is kept)"
            )
        tensors[f"param.{index}"] = value
    return tensors


def _optimizer_document(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The optimizer state as JSON, its tensors moved into `tensors` (a None value names one there)."""
    document: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        document_entries: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu()
                document_entries[key] = None
            else:
                document_entries[key] = value
        document["state"][str(index)] = document_entries
    return document


def _remove_stale_temporaries(root: Path) -> None:
    """Leftovers of a process killed while writing or removing a checkpoint (lofit's marked names only)."""
    remove_leftovers(root, depth=0)


def remove_checkpoint(path: Path) -> None:
    """Rename first (`.step-N.lofit-removing-...`), so an interrupted removal never leaves a half-deleted
    `step-*` directory."""
    remove_folder(path)


# ------------------------------------------------------------------------------------------ load
def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first (temporary directories are hidden, not listed)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in `directory`, or None (leftovers of killed writers are removed)."""
    remove_leftovers(directory, depth=0)  # of killed writers/removals, even if this run saves nothing
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def _read_document(state_path: Path) -> dict[str, Any]:
    try:
        document = json.loads(state_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{state_path}: not valid JSON ({error}); the checkpoint is corrupt") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise CheckpointError(f'{state_path}: not a lofit checkpoint (no "format": "{FORMAT_NAME}")')
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_path}: checkpoint format_version {document.get('format_version')!r} is not supported "
            f"(this lofit reads version {FORMAT_VERSION})"
        )
    expected = {"position": dict, "identity": dict, "scheduler": dict, "optimizer": dict, "rng": dict}
    for key, kind in {**expected, "history": dict}.items():
        if not isinstance(document.get(key), kind):
            raise CheckpointError(f"{state_path}: field {key!r} is missing or not an object")
    position = document["position"]
    for key in ("step", "epoch", "batch", "tokens_seen"):
        value = position.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(
                f"{state_path}: field 'position.{key}' must be an integer >= 0, got {value!r}"
            )
    return document


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and validate a checkpoint directory written by `save_checkpoint`.

    Args:
        path: a `step-XXXXXXXX` directory.

    Returns:
        The checkpoint; a missing, corrupt or foreign file raises `CheckpointError` saying what to do.
    """
    path = Path(path)
    state_path, tensors_path = path / STATE_NAME, path / TENSORS_NAME
    for required in (state_path, tensors_path):
        if not required.is_file():
            raise CheckpointError(
                f"{required} is missing; {path} is not a complete lofit checkpoint. Delete it to resume "
                "from the one before, or start afresh without --resume"
            )
    document = _read_document(state_path)
    position = document["position"]
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{tensors_path}: cannot read safetensors ({error}); the file is corrupt or truncated. Delete "
            f"{path} to resume from an earlier checkpoint, or start afresh"
        ) from None
    for key in ("data.generator", "rng.torch", "rng.numpy"):
        if key not in tensors:
            raise CheckpointError(f"{tensors_path}: tensor {key!r} is missing; the file is corrupt")
    return Checkpoint(
        path=path,
        position=LoopPosition(
            step=position["step"],
            epoch=position["epoch"],
            batch=position["batch"],
            generator_state=tensors["data.generator"],
            tokens_seen=position["tokens_seen"],
            elapsed_s=float(position.get("elapsed_s", 0.0)),
        ),
        identity=document["identity"],
        history=document["history"],
        document=document,
        tensors=tensors,
    )
