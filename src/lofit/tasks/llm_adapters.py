"""ARC-Easy, OpenBookQA, PIQA and WinoGrande from the LLM-Adapters instruction files, as "mc" records.

LLM-Adapters (AGI-Edgerunners/LLM-Adapters @ 8166572, `dataset/<name>/{train,test}.json`) renders each
question as one instruction string, e.g. ARC-Easy:

    "Please choose the correct answer to the question: {question}\\n\\nAnswer1: {a} Answer2: {b} ...
     \\n\\nAnswer format: answer1/answer2/..."

with `answer` = "answerK" and `output` = "the correct answer is answerK". We parse the instruction back
into question + choices and check every row: the format line must list exactly the parsed choices, the
instruction rebuilt from the parsed parts must equal the original character for character, and `output`
must agree with `answer`. A row that fails any check raises `DataError` (file, line, field).

Training files give SFT records of the correct option: prompt `mc_prompt(question)`, completion
`mc_completion(choice)`. An evaluator that scores "mc" records by log-likelihood should build its prompts
with the same two functions, so that training and scoring see the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .datadir import benchmark_dir, find_split_file
from .readers import RawRow, read_rows
from .records import Record, validate_record
from .task import MC_PROMPT_TEMPLATE, Task, generic_defaults


def mc_prompt(question: str) -> str:
    """The prompt for a multiple-choice question: "Question: {question}\\nAnswer:"."""
    return MC_PROMPT_TEMPLATE.format(question=question)


def mc_completion(choice: str) -> str:
    """The scored continuation for one option: the option text after one space."""
    return " " + choice


def mc_to_sft(record: Record) -> Record:
    """SFT record that teaches the correct option of an "mc" record."""
    return {
        "prompt": mc_prompt(record["question"]),
        "completion": mc_completion(record["choices"][record["answer"]]),
    }


@dataclass(frozen=True)
class InstructionStyle:
    """How one benchmark lays out its LLM-Adapters instruction."""

    prefix: str  # text before the question
    label: str  # "Answer" -> markers "Answer1: ", "Answer2: ", ...
    before_first: str  # between the question and the first marker
    between: str  # between one option's text and the next marker
    before_format: str  # between the last option and the "Answer format: " line

    def key(self, i: int) -> str:
        return f"{self.label.lower()}{i}"

    def render(self, question: str, choices: list[str]) -> str:
        options = self.between.join(f"{self.label}{i}: {c}" for i, c in enumerate(choices, start=1))
        keys = "/".join(self.key(i) for i in range(1, len(choices) + 1))
        return f"{self.prefix}{question}{self.before_first}{options}{self.before_format}{keys}"


_ANSWER = "Please choose the correct answer to the question: "
STYLES: dict[str, InstructionStyle] = {
    "arc_easy": InstructionStyle(_ANSWER, "Answer", "\n\n", " ", "\n\nAnswer format: "),
    "openbookqa": InstructionStyle(_ANSWER, "Answer", "\n\n", " ", "\n\nAnswer format: "),
    "piqa": InstructionStyle(
        "Please choose the correct solution to the question: ",
        "Solution",
        "\n\n",
        "\n\n",
        "\n\nAnswer format: ",
    ),
    "winogrande": InstructionStyle(
        "Please choose the correct answer to fill in the blank to complete the given sentence: ",
        "Option",
        "\n\n",
        " ",
        " Answer format: ",
    ),
}

# Files inside each benchmark folder (data dir layout of ../shared/data; `.json` is what `lofit data
# download` stores, the original JSON arrays).
SPLIT_FILES: dict[str, dict[str, str]] = {
    "arc_easy": {"train": "llm_adapters_train", "test": "llm_adapters_test"},
    "openbookqa": {"train": "llm_adapters_train", "test": "llm_adapters_test"},
    "piqa": {"test": "llm_adapters_test"},
    "winogrande": {"test": "llm_adapters_test"},
}


def parse_instruction(instruction: str, style: InstructionStyle) -> tuple[str, list[str]] | None:
    """Split an LLM-Adapters instruction into (question, choices); None if it does not fit `style`."""
    if not instruction.startswith(style.prefix):
        return None
    cut = instruction.rfind(style.before_format)
    if cut < 0:
        return None
    keys = instruction[cut + len(style.before_format) :].split("/")
    if len(keys) < 2 or keys != [style.key(i) for i in range(1, len(keys) + 1)]:
        return None
    body = instruction[len(style.prefix) : cut]
    first = body.rfind(f"{style.before_first}{style.label}1: ")
    if first < 0:
        return None
    question = body[:first]
    pos = first + len(style.before_first) + len(f"{style.label}1: ")
    choices = []
    for i in range(2, len(keys) + 1):
        marker = f"{style.between}{style.label}{i}: "
        nxt = body.find(marker, pos)
        if nxt < 0:
            return None
        choices.append(body[pos:nxt])
        pos = nxt + len(marker)
    choices.append(body[pos:])
    if style.render(question, choices) != instruction:
        return None
    return question, choices


def llm_adapters_record(row: RawRow, style: InstructionStyle) -> Record:
    """One LLM-Adapters row -> a validated "mc" record; `DataError` if any part does not check out."""
    data, where = row.data, row.where
    if not isinstance(data, dict):
        raise where.error(None, "expected a JSON object with 'instruction' and 'answer'", None)
    instruction = data.get("instruction")
    if not isinstance(instruction, str):
        raise where.error("instruction", "missing or not a string", "give the LLM-Adapters instruction text")
    parsed = parse_instruction(instruction, style)
    if parsed is None:
        raise where.error(
            "instruction",
            f"does not follow the LLM-Adapters layout '{style.render('QUESTION', ['A', 'B'])!r}'",
            "use the original LLM-Adapters file for this benchmark",
        )
    question, choices = parsed
    answer = data.get("answer")
    keys = [style.key(i) for i in range(1, len(choices) + 1)]
    if answer not in keys:
        raise where.error("answer", f"{answer!r} is not one of {'/'.join(keys)}", "name one of the options")
    output = data.get("output")
    if output is not None and output != f"the correct answer is {answer}":
        raise where.error("output", f"{output!r} disagrees with answer {answer!r}", "make them agree")
    record = {"question": question, "choices": choices, "answer": keys.index(answer)}
    return validate_record(record, "mc", where, distinct=False)  # published data, scored as published


def load_llm_adapters(path: str | Path, benchmark: str) -> list[Record]:
    """All rows of one LLM-Adapters file as "mc" records (`benchmark` picks the instruction layout)."""
    style = STYLES[benchmark]
    return [llm_adapters_record(row, style) for row in read_rows(path)]


def split_path(folder: Path, benchmark: str, split: str) -> Path:
    """The file of `split` inside a benchmark folder (jsonl as in ../shared/data, or downloaded json)."""
    stem = SPLIT_FILES[benchmark].get(split)
    if stem is None:
        raise DataError(
            folder,
            None,
            None,
            f"{benchmark} has no {split} split here",
            f"available splits: {', '.join(SPLIT_FILES[benchmark])}",
        )
    return find_split_file(folder, stem)


def load_mc_split(benchmark: str, split: str = "test", data_dir: str | Path | None = None) -> list[Record]:
    """One split of an LLM-Adapters benchmark as "mc" records, e.g. for out-of-domain evaluation."""
    _check_benchmark(benchmark)
    return load_llm_adapters(split_path(benchmark_dir(benchmark, data_dir), benchmark, split), benchmark)


def load_mc_benchmark(benchmark: str, data_dir: str | Path | None = None) -> Task:
    """A Task: SFT on the correct options of the train file (when there is one), "mc" test records.

    These sets ship no validation split, so `val` and `val_eval` are empty; PIQA and WinoGrande have no
    training file here either (their train sets are not in ../shared/data), so `train` is empty too.
    """
    _check_benchmark(benchmark)
    folder = benchmark_dir(benchmark, data_dir)
    sources = {split: split_path(folder, benchmark, split) for split in SPLIT_FILES[benchmark]}
    train = (
        [mc_to_sft(r) for r in load_llm_adapters(sources["train"], benchmark)] if "train" in sources else []
    )
    return Task(
        name=benchmark,
        objective="sft",
        eval_task="mc",
        train=train,
        val=[],
        val_eval=[],
        test=load_llm_adapters(sources["test"], benchmark),
        defaults=generic_defaults("sft"),
        sources={split: str(path) for split, path in sources.items()},
    )


def _check_benchmark(benchmark: str) -> None:
    if benchmark not in STYLES:
        raise DataError(
            None,
            None,
            None,
            f"unknown multiple-choice benchmark {benchmark!r}",
            f"use one of {', '.join(STYLES)}",
        )
