"""SVAMP (Patel et al. 2021; the 1,000 problems of LLM-Adapters' `dataset/SVAMP/SVAMP.json`).

The LoFiT paper trains on 350 problems, validates on 350 and tests on 300, a split it does not publish;
we draw it from a seeded permutation of the 1,000 problems (`seed`, recorded in `Task.info` with the
problem ids of each split). Each problem becomes

- prompt: `"Q: {Body} {Question}\\nA:"` (Body and Question joined by one space);
- training completion: `" {equation} = {answer}"`, the gold equation with numbers written canonically
  ("( 76 - 25 ) = 51"), i.e. the paper's "equation + answer";
- evaluation: greedy generation of `MAX_NEW_TOKENS` tokens, scored on the final number only
  (extraction "number": the last number on the first generated line, equal to the gold answer).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from ..errors import DataError
from .datadir import benchmark_dir, find_split_file
from .numbers import NUMBER, canonical_number
from .readers import RawRow, read_rows
from .records import Record, validate_record
from .task import Task, generic_defaults

SPLIT_SIZES = {"train": 350, "val": 350, "test": 300}
SVAMP_PROMPT_TEMPLATE = "Q: {body} {question}\nA:"
MAX_NEW_TOKENS = 32  # "( 76 - 25 ) = 51" is about 12 tokens; the longest gold equations need ~25
DEFAULT_SEED = 42


def _text(row: RawRow, field: str) -> str:
    value = row.data.get(field) if isinstance(row.data, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise row.where.error(field, "missing or not a non-empty string", "use the SVAMP release's fields")
    return value.strip()


def canonical_equation(equation: str) -> str:
    """The equation with each number written canonically: "( 76.0 - 25.0 )" -> "( 76 - 25 )".

    Example:
        >>> canonical_equation("( ( 3.0 * 1.5 ) + 2.0 )")
        '( ( 3 * 1.5 ) + 2 )'
    """
    return re.sub(NUMBER, lambda m: canonical_number(m.group(0)), equation)


def svamp_records(row: RawRow) -> tuple[Record, Record]:
    """(SFT record, "exact_match" record) of one SVAMP problem."""
    body, question, equation = _text(row, "Body"), _text(row, "sQuestion"), _text(row, "Equation")
    solution = row.data.get("lSolutions")
    if isinstance(solution, bool) or not isinstance(solution, (int, float)):
        raise row.where.error("lSolutions", "missing or not a number", "give the numeric answer")
    answer = canonical_number(str(float(solution)))
    prompt = SVAMP_PROMPT_TEMPLATE.format(body=body, question=question)
    sft = validate_record(
        {"prompt": prompt, "completion": f" {canonical_equation(equation)} = {answer}"}, "sft", row.where
    )
    scored = validate_record({"prompt": prompt, "answers": [answer]}, "exact_match", row.where)
    return sft, scored


def load_svamp(data_dir: str | Path | None = None, seed: int = DEFAULT_SEED) -> Task:
    """SVAMP with the paper's 350/350/300 split drawn by `seed` (ids of every split in `task.info`).

    Args:
        data_dir: the data root (default: lofit's usual search, e.g. ../shared/data or the cache).
        seed: seeds the permutation of the 1,000 problems.

    Returns:
        A Task: SFT `train`/`val`, "exact_match" `val_eval`/`test` with extraction "number".
    """
    path = find_split_file(benchmark_dir("svamp", data_dir), "svamp")
    rows = read_rows(path)
    needed = sum(SPLIT_SIZES.values())
    if len(rows) < needed:
        raise DataError(
            path,
            None,
            None,
            f"SVAMP has {len(rows)} problems here, the 350/350/300 split needs {needed}",
            "use the complete SVAMP.json of LLM-Adapters (`lofit data download svamp`)",
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    bounds = {"train": (0, 350), "val": (350, 700), "test": (700, 1000)}
    split_rows = {split: [rows[i] for i in order[a:b]] for split, (a, b) in bounds.items()}
    pairs = {split: [svamp_records(r) for r in chosen] for split, chosen in split_rows.items()}
    ids = {split: [str(r.data.get("ID")) for r in chosen] for split, chosen in split_rows.items()}
    return Task(
        name="svamp",
        objective="sft",
        eval_task="exact_match",
        train=[sft for sft, _ in pairs["train"]],
        val=[sft for sft, _ in pairs["val"]],
        val_eval=[scored for _, scored in pairs["val"]],
        test=[scored for _, scored in pairs["test"]],
        extraction="number",
        max_new_tokens=MAX_NEW_TOKENS,
        defaults=generic_defaults("sft"),
        sources={"all": str(path)},
        info={"split_seed": seed, "split_sizes": dict(SPLIT_SIZES), "ids": ids},
    )
