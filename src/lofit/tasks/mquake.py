"""MQuAKE (knowledge editing, LoFiT splits 134/95/864): SFT on the new answer, exact match on generation.

What the authors' code does (fc2869/lo-fit @ ebd344a, `utils/dataloaders.py`, class `MQUAKE`):

* edited_prompt = `requested_rewrite[0]["prompt"].format(subject) + " " + target_new["str"]`;
  prompt = `"Q: Imagine that {edited_prompt}. {question} A:"` with only `questions[0]` (the paraphrases
  are ignored); gold answers = `[new_answer] + new_answer_alias`.
* Training text = prompt + new_answer (+ "</s>" for Llama; Gemma's tokenizer adds EOS itself), with no
  space after "A:"; `lofit_trainer.py` masks the prompt with trl's DataCollatorForCompletionOnlyLM
  (response template " A:"), so the loss covers the answer and EOS. Hence our SFT record is
  {"prompt": prompt, "completion": new_answer} and the trainer appends EOS. The whole train file is used
  (`train_script_mquake.sh` passes no --train_size); val also gets training text (eval loss).
* Evaluation (`utils/evaluate.py:evaluate_mquake`): greedy, 16 new tokens; prediction = decoded text
  after the last "A:", up to the first "\\n", lower-cased and NOT stripped; correct iff it equals one of
  the lower-cased gold answers. That is `extraction="mquake"`.
"""

from __future__ import annotations

from pathlib import Path

from .datadir import benchmark_dir, find_split_file
from .readers import RawRow, read_rows
from .records import Record, validate_record
from .task import Task, paper_defaults

MQUAKE_PROMPT_TEMPLATE = "Q: Imagine that {edited_prompt}. {question} A:"
SPLIT_SIZES = {"train": 134, "val": 95, "test": 864}


def mquake_prompt_and_answers(row: RawRow) -> tuple[str, list[str]]:
    """(prompt, gold answers) of one MQuAKE case, exactly as LoFiT builds them."""
    case, where = row.data, row.where
    if not isinstance(case, dict):
        raise where.error(None, "expected an MQuAKE case object", None)
    rewrites = case.get("requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites or not isinstance(rewrites[0], dict):
        raise where.error("requested_rewrite", "missing or not a non-empty list of edits", None)
    edit = rewrites[0]
    try:
        fact = edit["prompt"].format(edit["subject"]) + " " + edit["target_new"]["str"]
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
        raise where.error(
            "requested_rewrite",
            f"the first edit lacks a usable prompt/subject/target_new.str ({type(exc).__name__}: {exc})",
            'give {"prompt": "... {} ...", "subject": ..., "target_new": {"str": ...}}',
        ) from None
    questions = case.get("questions")
    if not isinstance(questions, list) or not questions or not isinstance(questions[0], str):
        raise where.error("questions", "missing or not a non-empty list of strings", None)
    aliases = case.get("new_answer_alias", [])
    if not isinstance(aliases, list):
        raise where.error("new_answer_alias", "must be a list of strings", None)
    answers = [case.get("new_answer"), *aliases]
    prompt = MQUAKE_PROMPT_TEMPLATE.format(edited_prompt=fact, question=questions[0])
    checked = validate_record({"prompt": prompt, "answers": answers}, "exact_match", where)
    return prompt, checked["answers"]


def sft_record(row: RawRow) -> Record:
    """The SFT training record of one MQuAKE case (completion = the first gold answer)."""
    prompt, answers = mquake_prompt_and_answers(row)
    return {"prompt": prompt, "completion": answers[0]}


def eval_record(row: RawRow) -> Record:
    """The "exact_match" record of one MQuAKE case (every gold answer and alias)."""
    prompt, answers = mquake_prompt_and_answers(row)
    return {"prompt": prompt, "answers": answers}


def load_mquake(data_dir: str | Path | None = None) -> Task:
    """MQuAKE's LoFiT splits: SFT train/val, "exact_match" val_eval/test, extraction "mquake".

    Args:
        data_dir: the data root (see `resolve_data_dir`).

    Returns:
        The `Task`.
    """
    folder = benchmark_dir("mquake", data_dir)
    paths = {split: find_split_file(folder, split) for split in ("train", "val", "test")}
    rows = {split: read_rows(path) for split, path in paths.items()}
    return Task(
        name="mquake",
        objective="sft",
        eval_task="exact_match",
        train=[sft_record(r) for r in rows["train"]],
        val=[sft_record(r) for r in rows["val"]],
        val_eval=[eval_record(r) for r in rows["val"]],
        test=[eval_record(r) for r in rows["test"]],
        extraction="mquake",
        defaults=paper_defaults("mquake"),
        sources={split: str(path) for split, path in paths.items()},
    )
