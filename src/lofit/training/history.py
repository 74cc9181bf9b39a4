"""`TrainingHistory`: what a training run did, step by step (a plain value object, no torch)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainingHistory:
    """What a run did: one record per optimizer step, one per validation, the settings and a summary.

    Example:
        >>> history = TrainingHistory(steps=[{"step": 1, "loss": 2.5}], validation=[{"step": 1, "val_loss": 2.0}])
        >>> history.losses()
        [2.5]
        >>> print(history.to_jsonl(), end="")
        {"kind": "step", "step": 1, "loss": 2.5}
        {"kind": "val", "step": 1, "val_loss": 2.0}
    """

    steps: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def losses(self) -> list[float]:
        """The training loss of every optimizer step, in order."""
        return [record["loss"] for record in self.steps]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict with the four fields (read back by `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingHistory:
        """The history `to_dict` wrote (missing fields are empty)."""
        return cls(
            list(data.get("steps", [])),
            list(data.get("validation", [])),
            dict(data.get("settings", {})),
            dict(data.get("summary", {})),
        )

    def to_jsonl(self) -> str:
        """One JSON line per record, `kind` "step" or "val", ordered by step (a validation after its step)."""
        records = [{"kind": "step", **r} for r in self.steps] + [
            {"kind": "val", **r} for r in self.validation
        ]
        records.sort(key=lambda r: (r["step"], r["kind"] == "val"))
        return "".join(json.dumps(r) + "\n" for r in records)
