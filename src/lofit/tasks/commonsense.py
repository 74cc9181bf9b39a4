"""SIQA, ARC-Challenge and BoolQ from the LLM-Adapters instruction files, as "mc" records (Table 3).

SIQA (`dataset/social_i_qa/test.json`) and ARC-Challenge (`dataset/ARC-Challenge/{train,test}.json`)
use ARC-Easy's layout and are parsed and checked by `llm_adapters.llm_adapters_record`. LLM-Adapters
has SIQA's training rows only inside `ft-training_set/commonsense_170k.json`, so SIQA has a test split
only here. The paper's splits (100 training examples each; validation 100 / 299 / 100) are subsets the
caller draws (e.g. the seeded `sample` of `benchmarks.harness.stats`).

BoolQ (`dataset/boolq/{train,test}.json`): LLM-Adapters renders each row as

    "Please answer the following question with true or false, question: {question}\\n\\nAnswer format: true/false"

with `answer` "true" or "false" and `output` "the correct answer is {answer}". A row becomes the "mc" record
{"question": question, "choices": ["true", "false"], "answer": 0 or 1}; as for the other LLM-Adapters
sets, the instruction rebuilt from the parsed question must equal the original, and `output` must agree
with `answer` (else `DataError` naming file, line and field).
"""

from __future__ import annotations

from pathlib import Path

from .datadir import benchmark_dir, find_split_file
from .llm_adapters import InstructionStyle, llm_adapters_record, mc_to_sft
from .readers import RawRow, read_rows
from .records import Record, validate_record
from .task import Task, generic_defaults

BOOLQ_PREFIX = "Please answer the following question with true or false, question: "
BOOLQ_SUFFIX = "\n\nAnswer format: true/false"
CHOICES = ("true", "false")
_CHOOSE = InstructionStyle(
    "Please choose the correct answer to the question: ", "Answer", "\n\n", " ", "\n\nAnswer format: "
)
SPLIT_FILES: dict[str, dict[str, str]] = {
    "siqa": {"test": "llm_adapters_test"},
    "arc_challenge": {"train": "llm_adapters_train", "test": "llm_adapters_test"},
    "boolq": {"train": "llm_adapters_train", "test": "llm_adapters_test"},
}
COMMONSENSE_TASKS = tuple(SPLIT_FILES)


def boolq_record(row: RawRow) -> Record:
    """One LLM-Adapters BoolQ row -> a validated "mc" record."""
    data, where = row.data, row.where
    instruction = data.get("instruction") if isinstance(data, dict) else None
    if not isinstance(instruction, str):
        raise where.error("instruction", "missing or not a string", "give the LLM-Adapters instruction text")
    if not (instruction.startswith(BOOLQ_PREFIX) and instruction.endswith(BOOLQ_SUFFIX)):
        raise where.error(
            "instruction",
            f"does not follow the LLM-Adapters BoolQ layout {BOOLQ_PREFIX + 'QUESTION' + BOOLQ_SUFFIX!r}",
            "use the original LLM-Adapters boolq file",
        )
    question = instruction[len(BOOLQ_PREFIX) : len(instruction) - len(BOOLQ_SUFFIX)]
    answer = data.get("answer")
    if answer not in CHOICES:
        raise where.error("answer", f"{answer!r} is not 'true' or 'false'", "name one of them")
    output = data.get("output")
    if output is not None and output != f"the correct answer is {answer}":
        raise where.error("output", f"{output!r} disagrees with answer {answer!r}", "make them agree")
    record = {"question": question, "choices": list(CHOICES), "answer": CHOICES.index(answer)}
    return validate_record(record, "mc", where, distinct=False)  # published data, scored as published


def commonsense_record(row: RawRow, benchmark: str) -> Record:
    """One row of `benchmark`'s LLM-Adapters file as a validated "mc" record."""
    return boolq_record(row) if benchmark == "boolq" else llm_adapters_record(row, _CHOOSE)


def load_commonsense(benchmark: str, data_dir: str | Path | None = None) -> Task:
    """A Task: SFT on the correct options of the train file (if any), "mc" test records, no validation.

    Args:
        benchmark: "siqa", "arc_challenge" or "boolq".
        data_dir: the data root holding `<benchmark>/llm_adapters_{train,test}.json[l]`.

    Returns:
        The Task (with the LLM-Adapters files: SIQA test 1,954; ARC-Challenge 1,119 / 1,172; BoolQ
        9,427 / 3,270).
    """
    folder = benchmark_dir(benchmark, data_dir)
    paths = {split: find_split_file(folder, stem) for split, stem in SPLIT_FILES[benchmark].items()}
    rows = {split: read_rows(path) for split, path in paths.items()}
    records = {split: [commonsense_record(r, benchmark) for r in chosen] for split, chosen in rows.items()}
    return Task(
        name=benchmark,
        objective="sft",
        eval_task="mc",
        train=[mc_to_sft(r) for r in records.get("train", [])],
        val=[],
        val_eval=[],
        test=records["test"],
        defaults=generic_defaults("sft"),
        sources={split: str(path) for split, path in paths.items()},
    )
