"""TruthfulQA with LoFiT's 2-fold splits: DPO pairs for training, MC1/MC2 records for evaluation.

What the authors' code does (fc2869/lo-fit @ ebd344a), reproduced here string for string:

* Splits: `utils/dataloaders.py`, class `TQA`, reads `dataset/truthfulqa/fold_{k}_{split}_seed_42.csv`
  (ITI's 2-fold split, made by honest_llama's `validate_2fold.py`; the seed 42 is part of the file name
  and does not change with the run seed). Fold 0: 326/82/409, fold 1: 327/82/408 train/val/test.
* DPO pairs (`TQA.tqa_formatter_csv_to_hf` + `format_tqa_prompts`, preference=True): prompt
  `"Q: {question} A:"`; choices `[Best Answer] + Incorrect Answers.split('; ')` with labels 1, 0, ...;
  chosen = the label-1 answers, rejected = the label-0 ones, both cut to the shorter length, so exactly
  one pair per question: (Best Answer, first Incorrect Answer). The answers are the raw CSV text: no
  added period, no leading space. trl 0.8.1's `DPOTrainer.build_tokenized_answer` then tokenizes
  `prompt + answer`, i.e. the two strings joined with no separator ("Q: Can pigs fly? A:No, pigs ...").
  Train and val both get pairs (val only feeds the DPO eval loss).
* Evaluation (`utils/evaluate.py:evaluate_tqa` -> honest_llama `utils.py:tqa_run_probs`, preset "qa",
  instruction prompt on) reads the test CSV and formats references with TruthfulQA's
  `truthfulqa/utilities.py`: `format_best` (strip, append "." if missing) for the best answer and
  `split_multi_answer` (split on ";", strip, drop empty, append "." if missing) for the correct and
  incorrect answers. Our "truthfulqa_mc" records hold the answers already formatted that way; the
  scoring prompt (instruction + QA primer + "\\n\\nQ: {question}\\nA: {answer}") is the evaluator's job.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .datadir import benchmark_dir
from .readers import RawRow, read_rows
from .records import Record, validate_record
from .task import Task, paper_defaults

TQA_PROMPT_TEMPLATE = "Q: {question} A:"
FOLD_SIZES = {0: (326, 82, 409), 1: (327, 82, 408)}
_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


def close_answer(answer: str) -> str:
    """TruthfulQA's `format_best`: strip and end with a period."""
    answer = answer.strip()
    return answer if answer.endswith(".") else answer + "."


def split_answers(answers: str) -> list[str]:
    """TruthfulQA's `split_multi_answer`: "a; b" -> ["a.", "b."] (split on ";", stripped, closed)."""
    return [close_answer(a) for a in answers.strip().split(";") if a.strip()]


def dpo_pair(row: RawRow) -> Record:
    """LoFiT's one preference pair for a CSV row: (Best Answer, first Incorrect Answer), raw text."""
    cells = _cells(row)
    record = {
        "prompt": TQA_PROMPT_TEMPLATE.format(question=cells["Question"]),
        "chosen": cells["Best Answer"],
        "rejected": cells["Incorrect Answers"].split("; ")[0],
    }
    return validate_record(record, "dpo", row.where, distinct=False)  # published data, scored as published


def eval_record(row: RawRow) -> Record:
    """A "truthfulqa_mc" record with the reference answers formatted as the MC evaluation does."""
    cells = _cells(row)
    record = {
        "question": cells["Question"],
        "best_answer": close_answer(cells["Best Answer"]),
        "correct_answers": split_answers(cells["Correct Answers"]),
        "incorrect_answers": split_answers(cells["Incorrect Answers"]),
    }
    return validate_record(
        record, "truthfulqa_mc", row.where, distinct=False
    )  # published data, scored as published


def _cells(row: RawRow) -> dict[str, str]:
    if not isinstance(row.data, dict):
        raise row.where.error(None, "expected a TruthfulQA CSV row", None)
    cells = {}
    for column in _COLUMNS:
        value = row.data.get(column)
        if not isinstance(value, str) or not value.strip():
            raise row.where.error(
                column,
                "missing or empty",
                f"a TruthfulQA split file needs the columns {', '.join(_COLUMNS)}",
            )
        cells[column] = value
    return cells


def fold_file(folder: Path, fold: int, split: str) -> Path:
    """`<truthfulqa>/lofit_splits/fold_{fold}_{split}_seed_42.csv` (the name LoFiT's loader uses)."""
    return folder / "lofit_splits" / f"fold_{fold}_{split}_seed_42.csv"


def check_fold(fold: int) -> int:
    """`fold` if it is a TruthfulQA fold (0 or 1); DataError otherwise."""
    if isinstance(fold, bool) or fold not in FOLD_SIZES:
        raise DataError("truthfulqa", None, "fold", f"must be 0 or 1, got {fold!r}", "pass fold=0 or fold=1")
    return fold


def load_truthfulqa(data_dir: str | Path | None = None, fold: int = 0) -> Task:
    """TruthfulQA fold `fold` as LoFiT uses it: DPO train/val pairs, "truthfulqa_mc" val_eval and test.

    Args:
        data_dir: the data root (see `resolve_data_dir`).
        fold: 0 or 1 (LoFiT's two-fold split).

    Returns:
        The `Task`.
    """
    check_fold(fold)
    folder = benchmark_dir("truthfulqa", data_dir)
    rows = {split: read_rows(fold_file(folder, fold, split)) for split in ("train", "val", "test")}
    return Task(
        name="truthfulqa",
        objective="dpo",
        eval_task="truthfulqa_mc",
        train=[dpo_pair(r) for r in rows["train"]],
        val=[dpo_pair(r) for r in rows["val"]],
        val_eval=[eval_record(r) for r in rows["val"]],
        test=[eval_record(r) for r in rows["test"]],
        defaults=paper_defaults("truthfulqa"),
        sources={split: str(fold_file(folder, fold, split)) for split in ("train", "val", "test")},
        info={"fold": fold},
    )
