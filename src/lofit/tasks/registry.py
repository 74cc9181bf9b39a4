"""`load_task(name, ...)`: the built-in benchmarks and the generic tasks over user files.

Built-in: truthfulqa (DPO, "truthfulqa_mc"), mquake and clutrr (SFT, "exact_match" with their answer
extraction), arc_easy, arc_challenge, openbookqa, piqa, siqa, winogrande, boolq (SFT on the correct
option, "mc"), and svamp (SFT on equation + answer, "exact_match" on the final number; `seed` draws its
350/350/300 split).

Generic tasks read the user's files (jsonl, json or csv; any record format that converts, see
`convert.py`):
    sft          train/val: SFT records. Evaluated on the test file's format: "mc" or "exact_match"
                 records as they are, SFT records as "exact_match" with answers = [completion].
    dpo          train/val: DPO records. Evaluated as "mc": DPO test records become question = prompt,
                 choices = [chosen, rejected], answer = 0 (preference accuracy by log-likelihood);
                 "mc", "exact_match" or "truthfulqa_mc" test files are used as they are.
    mc           test: "mc" records; train/val: "mc" records (SFT on the correct option) or SFT records.
    exact_match  test: "exact_match" records; train/val: SFT records or "exact_match" records (SFT on
                 the first answer).
A val file gives both `val` (training format, for the validation loss) and `val_eval` (evaluation
format) where its records convert; no file means both are empty (no split is carved from train).
For built-in tasks, a given file replaces that split.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .clutrr import load_clutrr
from .commonsense import COMMONSENSE_TASKS, load_commonsense
from .convert import can_convert, convert_records
from .generic import describe_source, load_records_with_kind
from .llm_adapters import STYLES, load_mc_benchmark
from .mquake import load_mquake
from .records import Record
from .svamp import load_svamp
from .task import Task, generic_defaults, paper_defaults
from .truthfulqa import check_fold, load_truthfulqa

PAPER_TASKS = ("truthfulqa", "mquake", "clutrr")
MC_TASKS = (*STYLES, *COMMONSENSE_TASKS)
EXACT_MATCH_TASKS = ("svamp",)  # generation scored on the final number
GENERIC_TASKS = ("sft", "dpo", "mc", "exact_match")
TASK_NAMES = PAPER_TASKS + MC_TASKS + EXACT_MATCH_TASKS + GENERIC_TASKS

FileArg = str | Path | None


def load_task(
    name: str,
    data_dir: str | Path | None = None,
    fold: int = 0,
    seed: int = 42,
    train_file: FileArg = None,
    val_file: FileArg = None,
    test_file: FileArg = None,
    needs: tuple[str, ...] | None = None,
) -> Task:
    """Load a task by name.

    Args:
        name: one of `TASK_NAMES`.
        data_dir: where the benchmark files live (see `resolve_data_dir`).
        fold: TruthfulQA's fold (0 or 1).
        seed: picks CLUTRR's 300 training stories and SVAMP's split.
        train_file, val_file, test_file: the user's files; for built-in tasks they replace that split.
        needs: the splits the caller uses ("train", "val", "test"); a generic task requires the file of
            each (default: "train" for sft/dpo, "test" for mc/exact_match), so `lofit select --task mc`
            needs no test file.

    Returns:
        The `Task`.

    Example:
        >>> task = load_task("mquake")            # doctest: +SKIP
        >>> task.train[0]["prompt"][:17], task.eval_task  # doctest: +SKIP
        ('Q: Imagine that T', 'exact_match')
    """
    if name in GENERIC_TASKS:
        return _generic_task(name, train_file, val_file, test_file, needs)
    if name not in TASK_NAMES:
        raise DataError(None, None, None, f"unknown task {name!r}", f"choose one of {', '.join(TASK_NAMES)}")
    if name == "truthfulqa":
        check_fold(fold)
    files = {"train": train_file, "val": val_file, "test": test_file}
    if all(f is not None for f in files.values()):
        base = _builtin_shell(name)  # every split given: the built-in data is not needed
    elif name == "truthfulqa":
        base = load_truthfulqa(data_dir, fold)
    elif name == "mquake":
        base = load_mquake(data_dir)
    elif name == "clutrr":
        base = load_clutrr(data_dir, seed)
    elif name == "svamp":
        base = load_svamp(data_dir, seed)
    elif name in COMMONSENSE_TASKS:
        base = load_commonsense(name, data_dir)
    else:
        base = load_mc_benchmark(name, data_dir)
    return _override(base, files)


def _builtin_shell(name: str) -> Task:
    """An empty Task with a built-in task's settings, to be filled from user files."""
    if name == "truthfulqa":
        return Task(name, "dpo", "truthfulqa_mc", [], [], [], [], defaults=paper_defaults(name))
    if name == "mquake":
        return Task(name, "sft", "exact_match", [], [], [], [], "mquake", defaults=paper_defaults(name))
    if name == "clutrr":
        return Task(name, "sft", "exact_match", [], [], [], [], "clutrr", defaults=paper_defaults(name))
    if name == "svamp":
        return Task(
            name, "sft", "exact_match", [], [], [], [], "number", 32, defaults=generic_defaults("sft")
        )
    return Task(name, "sft", "mc", [], [], [], [], defaults=generic_defaults("sft"))


def _override(task: Task, files: dict[str, FileArg]) -> Task:
    if files["train"] is not None:
        task.train = _load_as(files["train"], task.objective)
        task.sources["train"] = str(files["train"])
    if files["val"] is not None:
        task.val, task.val_eval = _load_val(files["val"], task.objective, task.eval_task)
        task.sources["val"] = str(files["val"])
    if files["test"] is not None:
        task.test = _load_as(files["test"], task.eval_task)
        task.sources["test"] = str(files["test"])
    return task


def _check_required(name: str, files: dict[str, FileArg], needs: tuple[str, ...] | None) -> None:
    required = needs if needs is not None else (("train",) if name in ("sft", "dpo") else ("test",))
    for split in required:
        if files.get(split) is None:
            flag = f"{split}_file (--{split})"
            raise DataError(None, None, None, f"the {name!r} task reads your own files", f"pass {flag}")


def _generic_task(
    name: str, train_file: FileArg, val_file: FileArg, test_file: FileArg, needs: tuple[str, ...] | None
) -> Task:
    objective = "dpo" if name == "dpo" else "sft"
    files = {"train": train_file, "val": val_file, "test": test_file}
    if not any(files.values()):
        _check_required(name, files, needs)
    eval_task: str = name if name in ("mc", "exact_match") else "mc" if objective == "dpo" else "exact_match"
    test: list[Record] = []
    eval_options: dict[str, str] = {}
    if test_file is not None:
        test_kind, records = load_records_with_kind(test_file)
        if name not in ("mc", "exact_match"):  # training-format test files: the matching evaluation format
            eval_task = {"sft": "exact_match", "dpo": "mc"}.get(test_kind, test_kind)
        test = convert_records(records, test_kind, eval_task, describe_source(test_file))
        if test_kind == "dpo":  # the prompt is scored verbatim, the answers appended without a separator
            eval_options = {"prompt_template": "{question}", "choice_template": "{choice}"}
    train = _load_as(train_file, objective) if train_file is not None else []
    val, val_eval = _load_val(val_file, objective, eval_task) if val_file is not None else ([], [])
    _check_required(name, files, needs)
    sources = {k: str(v) for k, v in files.items() if v}
    return Task(
        name=name,
        objective=objective,  # type: ignore[arg-type]
        eval_task=eval_task,  # type: ignore[arg-type]
        train=train,
        val=val,
        val_eval=val_eval,
        test=test,
        defaults=generic_defaults(objective),
        sources=sources,
        eval_options=eval_options,
    )


def _load_as(source: str | Path, kind: str) -> list[Record]:
    found, records = load_records_with_kind(source)
    return convert_records(records, found, kind, describe_source(source))


def _load_val(source: str | Path, objective: str, eval_task: str) -> tuple[list[Record], list[Record]]:
    found, records = load_records_with_kind(source)
    label = describe_source(source)
    if not (can_convert(found, objective) or can_convert(found, eval_task)):
        convert_records(records, found, objective, label)  # raises, naming the formats that would do
    val = convert_records(records, found, objective, label) if can_convert(found, objective) else []
    val_eval = convert_records(records, found, eval_task, label) if can_convert(found, eval_task) else []
    return val, val_eval
