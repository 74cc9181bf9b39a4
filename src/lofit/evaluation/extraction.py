"""Turn a generation into a prediction and match it against gold answers (LoFiT's `utils/evaluate.py` rules).

LoFiT decodes prompt + new tokens together (`batch_decode(outputs, skip_special_tokens=True)`) and
extracts from that text:
- "mquake": text after the last "A:", up to the first "\\n", lower-cased; correct iff equal to a gold
  answer lower-cased. The authors do not strip whitespace; `matches(..., stripped=True)` is the variant
  that strips both sides.
- "clutrr": text after the first "'s\\n" (the end of LoFiT's CLUTRR prompt) up to the next one, then up
  to the first ".", stripped, lower-cased; equal to a gold answer lower-cased. Prompts without "'s\\n"
  use the generated text alone.
- "number" (SVAMP): the last number in the generated text's first line (commas dropped), written
  canonically (`canonical_number`: "51.0" -> "51"); equal to a gold answer written the same way.
- None: the generated text alone (new tokens only), compared exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from ..errors import LofitValueError
from ..tasks.numbers import NUMBER, canonical_number

Extraction = Literal["mquake", "clutrr", "number"] | None
EXTRACTIONS = ("mquake", "clutrr", "number", None)
CLUTRR_ANSWER_MARK = "'s\n"


def extract(full_text: str, completion: str, extraction: Extraction) -> str:
    """The prediction read out of one generation.

    Args:
        full_text: prompt + completion decoded together.
        completion: the new tokens decoded alone.
        extraction: "mquake" (text after the last "A:" up to the first newline), "clutrr" (text up to the
            first "." after the story's "'s\\n" marker, stripped), or None (the completion as is).

    Returns:
        The prediction text.

    Example:
        >>> extract("Q: x? A: Paris\\nQ:", " Paris\\nQ:", "mquake")
        ' paris'
    """
    if extraction == "mquake":
        return full_text.split("A:")[-1].split("\n")[0].lower()
    if extraction == "clutrr":
        tail = full_text.split(CLUTRR_ANSWER_MARK)[1] if CLUTRR_ANSWER_MARK in full_text else completion
        return tail.split(".")[0].strip().lower()
    if extraction == "number":
        found = NUMBER.findall(completion.split("\n")[0])
        return canonical_number(found[-1]) if found else ""
    if extraction is None:
        return completion
    raise LofitValueError(f"extraction must be one of {EXTRACTIONS}, got {extraction!r}")


def matches(
    prediction: str, answers: Sequence[str], extraction: Extraction, *, stripped: bool = False
) -> bool:
    """Whether `prediction` equals one of `answers`.

    Args:
        prediction: the extracted prediction.
        answers: the gold answers.
        extraction: the extraction rule (mquake/clutrr compare lower-cased).
        stripped: compare with surrounding whitespace removed on both sides.

    Returns:
        True on a match.
    """
    if extraction == "number":
        return bool(prediction) and prediction in {canonical_number(a) for a in answers}
    golds = [a.lower() for a in answers] if extraction in ("mquake", "clutrr") else list(answers)
    if stripped:
        return prediction.strip() in {g.strip() for g in golds}
    return prediction in golds


def strips_already(extraction: Extraction) -> bool:
    """True where the rule strips the prediction itself, so a stripped variant would add nothing.

    Args:
        extraction: the extraction rule.

    Returns:
        Whether a separate stripped metric is redundant.
    """
    return extraction in ("clutrr", "number")
