"""Tasks and data: the record formats, the benchmark loaders and the generic file loaders.

>>> from lofit.tasks import load_task
>>> task = load_task("truthfulqa", fold=0)          # doctest: +SKIP
>>> task.objective, task.eval_task, len(task.train)  # doctest: +SKIP
('dpo', 'truthfulqa_mc', 326)
"""

from __future__ import annotations

from ..errors import DataError
from .clutrr import load_clutrr
from .convert import convert_records
from .datadir import cache_data_dir, resolve_data_dir
from .download import DownloadError, download_data
from .generic import load_records
from .llm_adapters import load_mc_benchmark, load_mc_split, mc_completion, mc_prompt, mc_to_sft
from .mquake import load_mquake
from .records import (
    EVAL_KINDS,
    RECORD_KINDS,
    TRAINING_KINDS,
    DPORecord,
    ExactMatchRecord,
    MCRecord,
    SFTRecord,
    TruthfulQARecord,
    detect_kind,
)
from .registry import TASK_NAMES, load_task
from .task import Task
from .truthfulqa import load_truthfulqa

__all__ = [
    "EVAL_KINDS",
    "RECORD_KINDS",
    "TASK_NAMES",
    "TRAINING_KINDS",
    "DPORecord",
    "DataError",
    "DownloadError",
    "ExactMatchRecord",
    "MCRecord",
    "SFTRecord",
    "Task",
    "TruthfulQARecord",
    "cache_data_dir",
    "convert_records",
    "detect_kind",
    "download_data",
    "load_clutrr",
    "load_mc_benchmark",
    "load_mc_split",
    "load_mquake",
    "load_records",
    "load_task",
    "load_truthfulqa",
    "mc_completion",
    "mc_prompt",
    "mc_to_sft",
    "resolve_data_dir",
]
