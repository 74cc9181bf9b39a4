"""CLUTRR (task 1.2, 2-hop kinship; LoFiT splits): SFT on 300 sampled stories, exact match on the relation.

What the authors' code does (fc2869/lo-fit @ ebd344a, `utils/dataloaders.py`, class `CLUTRR`):

* story = `clean_story` with "[" and "]" removed; `query` such as "('Herman', 'Rosalee')" is parsed by
  `query[1:-1].replace("'", "").split(",")` into per1 = "Herman" and per2 = " Rosalee" -- note the
  leading space that the split leaves on per2. The template is filled as `.format(story, per2, per1,
  per2, per1)`, so the prompt holds two spaces before per2 ("how is  Rosalee related to Herman?
  Answer:  Rosalee is Herman 's"). We keep that exactly (docs/method.md §6).
* Training/val text = prompt_body + "\\n" + target_text (+ "</s>" for Llama); test prompt =
  prompt_body + "\\n". `lofit_trainer.py` masks the prompt with DataCollatorForCompletionOnlyLM
  (response template " 's\\n"). So SFT = {"prompt": prompt_body + "\\n", "completion": target_text} and
  the trainer appends EOS.
* Training subset: `train_script_clutrr.sh` passes `--train_size 300`; `load_data` then calls
  `random.sample(data_json, 300)` on the 3,151 training stories, after `lofit_trainer.py` has seeded
  Python's `random` with the run seed (`random.seed(seed)`, then `transformers.set_seed(seed)`, which
  seeds it again) and nothing draws from `random` in between. `random.Random(seed).sample(rows, 300)`
  draws the same stories in the same order. (Their script runs step 1 with seed 42 and step 2 with
  seed 12450, so the two steps see different subsets.) Val and test are used whole (450 each).
* Evaluation (`utils/evaluate.py:evaluate_clutrr`): greedy, 16 new tokens; prediction = text after
  "'s\\n", cut at the first ".", stripped, lower-cased; exact match with target_text (lower-cased). That
  is `extraction="clutrr"`.
"""

from __future__ import annotations

import random
from pathlib import Path

from .datadir import benchmark_dir, find_split_file
from .readers import RawRow, read_rows
from .records import Record, validate_record
from .task import Task, paper_defaults

CLUTRR_PROMPT_TEMPLATE = (
    'Read the following story about a family. "{}" Assume the relations described in the story are all '
    "true. Based on relations between the fictional characters in the story (assume the relations are all "
    "true) and your commonsense knowledge about family relationship, how is {} related to {}? Answer: {} "
    "is {} 's"
)
TRAIN_SIZE = 300
SPLIT_SIZES = {"train": 3151, "val": 450, "test": 450}


def clutrr_prompt_and_answer(row: RawRow) -> tuple[str, str]:
    """(prompt ending in "'s\\n", gold relation) of one CLUTRR story, exactly as LoFiT builds them."""
    data, where = row.data, row.where
    if not isinstance(data, dict):
        raise where.error(None, "expected a CLUTRR record object", None)
    for name in ("clean_story", "query", "target_text"):
        if not isinstance(data.get(name), str) or not data[name].strip():
            raise where.error(name, "missing or not a non-empty string", "use LoFiT's CLUTRR split files")
    persons = data["query"][1:-1].replace("'", "").split(",")
    if len(persons) < 2:
        raise where.error(
            "query", f"{data['query']!r} does not name two people", "write it as \"('A', 'B')\""
        )
    per1, per2 = persons[0], persons[1]
    story = data["clean_story"].replace("[", "").replace("]", "")
    prompt = CLUTRR_PROMPT_TEMPLATE.format(story, per2, per1, per2, per1) + "\n"
    return prompt, data["target_text"]


def sft_record(row: RawRow) -> Record:
    """The SFT training record of one CLUTRR story (prompt, completion = the gold relation)."""
    prompt, relation = clutrr_prompt_and_answer(row)
    return validate_record({"prompt": prompt, "completion": relation}, "sft", row.where)


def eval_record(row: RawRow) -> Record:
    """The "exact_match" record of one CLUTRR story (prompt, answers = [the gold relation])."""
    prompt, relation = clutrr_prompt_and_answer(row)
    return validate_record({"prompt": prompt, "answers": [relation]}, "exact_match", row.where)


def sample_train(rows: list[RawRow], seed: int, size: int = TRAIN_SIZE) -> list[RawRow]:
    """LoFiT's seeded subset: `random.seed(seed); random.sample(rows, size)` (all rows if fewer)."""
    if size >= len(rows):
        return list(rows)
    return random.Random(seed).sample(rows, size)


def load_clutrr(
    data_dir: str | Path | None = None, seed: int = 42, train_size: int | None = TRAIN_SIZE
) -> Task:
    """CLUTRR as LoFiT uses it: SFT training on a seeded sample of stories, exact match on val and test.

    Args:
        data_dir: the data root (see `resolve_data_dir`).
        seed: the seed of LoFiT's `random.sample` of training stories.
        train_size: stories kept for training (None = all 3,151).

    Returns:
        The `Task` (extraction "clutrr").
    """
    folder = benchmark_dir("clutrr", data_dir)
    paths = {split: find_split_file(folder, split) for split in ("train", "val", "test")}
    rows = {split: read_rows(path) for split, path in paths.items()}
    train_rows = rows["train"] if train_size is None else sample_train(rows["train"], seed, train_size)
    return Task(
        name="clutrr",
        objective="sft",
        eval_task="exact_match",
        train=[sft_record(r) for r in train_rows],
        val=[sft_record(r) for r in rows["val"]],
        val_eval=[eval_record(r) for r in rows["val"]],
        test=[eval_record(r) for r in rows["test"]],
        extraction="clutrr",
        defaults=paper_defaults("clutrr"),
        sources={split: str(path) for split, path in paths.items()},
        info={
            "seed": seed,
            "train_size": len(train_rows),
            "train_pool": len(rows["train"]),
            "train_lines": [r.where.line for r in train_rows],
        },
    )
