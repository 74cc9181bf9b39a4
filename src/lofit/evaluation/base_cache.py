"""A cache of base-model evaluations: `lofit run` scores the unchanged base on the unchanged test set once.

The base model's metrics and per-record details are stored under `<cache root>/base-eval/<key>.json`
(cache root: `$LOFIT_CACHE_DIR`, default ~/.cache/lofit, as for the bundled model). The key is the
SHA-256 of everything the numbers depend on:

- the base model: the digest of every parameter tensor (`lofit.adapters.fingerprint.weights_fingerprint`),
  its config (without paths and versions) and dtype, and the device type;
- the data: the canonical JSON of every test record, in order;
- the protocol: the evaluation task and its options (templates, batch size, ...);
- the versions of lofit, torch and transformers, and a hash of the evaluation code itself
  (`lofit/evaluation/*.py`: a development checkout changes its scoring or its details without a new
  version number).

Safety: entries are written atomically (`lofit.io.atomic`), read with `O_NOFOLLOW`, and neither the
cache root, its `base-eval` folder nor an entry may be a symbolic link (the cache is then skipped, with
the reason recorded). An entry is used only when it parses, names the same key, has one detail per test
record with the same questions, and holds finite metrics; an evaluation with a non-finite metric or
score is never stored. `LOFIT_EVAL_CACHE=off` turns the cache off.

Example:
    >>> cache = BaseEvalCache.off("disabled for the example")
    >>> cache.load() is None, cache.status
    (True, 'off: disabled for the example')
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import __version__

CACHE_SWITCH = "LOFIT_EVAL_CACHE"
FOLDER = "base-eval"
FORMAT = "lofit-base-eval-1"

Evaluation = tuple[dict[str, float], list[dict[str, Any]]]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What the base model's scores depend on: its weights' digest, config, dtype and device type.

    Args:
        model: the base model (adapter layers may be injected; their parameters are left out).

    Returns:
        A JSON-able dict.
    """
    from ..adapters.fingerprint import weights_fingerprint

    parameter = next(model.parameters())
    config = getattr(model, "config", None)
    fields = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    fields = {k: v for k, v in fields.items() if not k.startswith("_") and k != "transformers_version"}
    return {
        "weights": weights_fingerprint(model),
        "config": fields,
        "dtype": str(parameter.dtype),
        "device": parameter.device.type,
    }


def evaluation_code_hash() -> str:
    """SHA-256 of the source of every module of `lofit.evaluation` (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(model: nn.Module, records: list[Any], task: str, options: dict[str, Any]) -> str:
    """The SHA-256 key of a base evaluation (see the module docstring).

    Args:
        model: the base model.
        records: the test records, in order.
        task: the evaluation task ("truthfulqa_mc", "mc", "exact_match").
        options: the evaluation's keyword arguments (`progress` is ignored).

    Returns:
        64 hex digits.
    """
    import torch
    import transformers

    protocol = {"task": task, "options": {k: v for k, v in options.items() if k != "progress"}}
    data_hash = hashlib.sha256(_canonical([dict(r) for r in records]).encode()).hexdigest()
    key = {
        "format": FORMAT,
        "model": model_identity(model),
        "data": data_hash,
        "protocol": protocol,
        "versions": {
            "lofit": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "evaluation_code": evaluation_code_hash(),
        },
    }
    return hashlib.sha256(_canonical(key).encode()).hexdigest()


def _finite_numbers(value: Any) -> bool:
    """True if every number inside `value` (nested lists/dicts) is finite."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite_numbers(v) for v in value)
    return False


def _not_a_link(path: Path) -> str | None:
    """Why `path` may not be used (a symbolic link or not a directory), or None if it is fine or absent."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISDIR(mode):
        return f"{path} is not a directory"
    return None


@dataclass
class BaseEvalCache:
    """One base evaluation's cache entry (`path`), or a disabled cache (`path` None) with the reason.

    `status` says what happened, for metrics.json: "hit <path>", "stored <path>", "miss", "off: why",
    "not stored: why".
    """

    path: Path | None
    key: str
    records: list[Any]
    status: str = "miss"

    @classmethod
    def off(cls, reason: str) -> BaseEvalCache:
        """A cache that neither reads nor writes."""
        return cls(None, "", [], f"off: {reason}")

    @classmethod
    def open(
        cls,
        model: nn.Module,
        records: list[Any],
        task: str,
        options: dict[str, Any],
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> BaseEvalCache:
        """The entry of this base evaluation under the cache root (`lofit.io.bundled.resolve_cache_dir`).

        Args:
            model: the base model (with the adapter disabled or not yet attached).
            records: the test records.
            task: the evaluation task.
            options: the evaluation's keyword arguments.
            cache_dir: the cache root (default `$LOFIT_CACHE_DIR` or ~/.cache/lofit).

        Returns:
            The cache entry, or a disabled one (switched off, or a symbolic link on the way).
        """
        from ..io.bundled import resolve_cache_dir

        if os.environ.get(CACHE_SWITCH, "").lower() in ("off", "0", "no", "false"):
            return cls.off(f"{CACHE_SWITCH}={os.environ[CACHE_SWITCH]}")
        root = resolve_cache_dir(cache_dir)
        folder = root / FOLDER
        for path in (root, folder):
            problem = _not_a_link(path)
            if problem is not None:
                return cls.off(problem)
        key = cache_key(model, records, task, options)
        return cls(folder / f"{key}.json", key, list(records))

    def load(self) -> Evaluation | None:
        """The cached `(metrics, details)`, or None (no entry, or one that fails a check: it is then ignored)."""
        if self.path is None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        except OSError as error:  # a link (ELOOP) or unreadable
            self.status = f"off: cannot read {self.path} ({error.strerror})"
            return None
        try:
            with os.fdopen(fd, encoding="utf-8") as handle:
                entry = json.load(handle)
        except (OSError, ValueError, RecursionError):
            self.status = "miss (unreadable entry, recomputed)"
            return None
        if not self._valid(entry):
            self.status = "miss (entry failed its checks, recomputed)"
            return None
        self.status = f"hit {self.path}"
        return entry["metrics"], entry["details"]

    def _valid(self, entry: Any) -> bool:
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != self.key:
            return False
        metrics, details = entry.get("metrics"), entry.get("details")
        if not isinstance(metrics, dict) or not metrics or not isinstance(details, list):
            return False
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
            return False
        if not _finite_numbers(metrics) or len(details) != len(self.records):
            return False
        for detail, record in zip(details, self.records, strict=True):
            if not isinstance(detail, dict):
                return False
            if "question" in detail and "question" in record and detail["question"] != record["question"]:
                return False
        return True

    def store(self, evaluation: Evaluation) -> None:
        """Write `(metrics, details)` atomically, unless it holds a non-finite number (then say why)."""
        from ..io.atomic import atomic_write_text

        if self.path is None:
            return
        metrics, details = evaluation
        if not _finite_numbers(metrics) or not _finite_numbers(details):
            self.status = "not stored: a metric or score is not finite"
            return
        problem = _not_a_link(self.path.parent.parent) or _not_a_link(self.path.parent)
        if problem is None and self.path.is_symlink():
            problem = f"{self.path} is a symbolic link"
        if problem is not None:
            self.status = f"not stored: {problem}"
            return
        entry = {"format": FORMAT, "key": self.key, "metrics": metrics, "details": details}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            problem = _not_a_link(self.path.parent)  # created by someone else meanwhile?
            if problem is not None:
                self.status = f"not stored: {problem}"
                return
            atomic_write_text(self.path, _canonical(entry) + "\n")
        except OSError as error:
            self.status = f"not stored: {error}"
            return
        self.status = f"stored {self.path}"
