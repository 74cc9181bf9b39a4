"""Turn records of one format into another where the meaning is clear (e.g. SFT pairs into exact-match tests).

Conversions (any other pair raises `DataError`):
    -> "sft":          "mc" (prompt `mc_prompt(question)`, completion " " + correct choice),
                       "exact_match" (completion = first answer)
    -> "dpo":          "truthfulqa_mc" (LoFiT's pair: "Q: {question} A:", best answer vs first incorrect),
                       "mc" (correct choice vs the first wrong one, both as `mc_completion`)
    -> "exact_match":  "sft" (answers = [completion], verbatim)
    -> "mc":           "dpo" (question = prompt, choices = [chosen, rejected], answer = 0)
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import DataError
from .llm_adapters import mc_completion, mc_prompt, mc_to_sft
from .records import Record
from .truthfulqa import TQA_PROMPT_TEMPLATE


def _exact_match_to_sft(r: Record) -> Record:
    return {"prompt": r["prompt"], "completion": r["answers"][0]}


def _truthfulqa_to_dpo(r: Record) -> Record:
    return {
        "prompt": TQA_PROMPT_TEMPLATE.format(question=r["question"]),
        "chosen": r["best_answer"],
        "rejected": r["incorrect_answers"][0],
    }


def _mc_to_dpo(r: Record) -> Record:
    wrong = next(i for i in range(len(r["choices"])) if i != r["answer"])
    return {
        "prompt": mc_prompt(r["question"]),
        "chosen": mc_completion(r["choices"][r["answer"]]),
        "rejected": mc_completion(r["choices"][wrong]),
    }


def _sft_to_exact_match(r: Record) -> Record:
    return {"prompt": r["prompt"], "answers": [r["completion"]]}


def _dpo_to_mc(r: Record) -> Record:
    return {"question": r["prompt"], "choices": [r["chosen"], r["rejected"]], "answer": 0}


CONVERSIONS: dict[tuple[str, str], Callable[[Record], Record]] = {
    ("mc", "sft"): mc_to_sft,
    ("exact_match", "sft"): _exact_match_to_sft,
    ("truthfulqa_mc", "dpo"): _truthfulqa_to_dpo,
    ("mc", "dpo"): _mc_to_dpo,
    ("sft", "exact_match"): _sft_to_exact_match,
    ("dpo", "mc"): _dpo_to_mc,
}


def can_convert(from_kind: str, to_kind: str) -> bool:
    """Whether records of `from_kind` convert to `to_kind` (the same kind always does).

    Args:
        from_kind: the records' format.
        to_kind: the wanted format.

    Returns:
        True if `convert_records` can do it.

    Example:
        >>> can_convert("mc", "sft"), can_convert("sft", "mc")
        (True, False)
    """
    return from_kind == to_kind or (from_kind, to_kind) in CONVERSIONS


def convert_records(
    records: list[Record], from_kind: str, to_kind: str, source: str | None = None
) -> list[Record]:
    """Records of `from_kind` as `to_kind` (a copy).

    Args:
        records: validated records.
        from_kind: their format.
        to_kind: the wanted format.
        source: the file they came from, for the error message.

    Returns:
        The converted records.

    Raises:
        DataError: there is no conversion (the message names `source` and the formats that would do).
    """
    if from_kind == to_kind:
        return [dict(r) for r in records]
    convert = CONVERSIONS.get((from_kind, to_kind))
    if convert is None:
        usable = sorted({a for (a, b) in CONVERSIONS if b == to_kind} | {to_kind})
        raise DataError(
            source,
            None,
            None,
            f"holds {from_kind!r} records, but {to_kind!r} records are needed here",
            f"give a file in one of these formats: {', '.join(usable)}",
        )
    return [convert(r) for r in records]
