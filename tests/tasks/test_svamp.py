"""SVAMP (seeded 350/350/300 split, equation + answer, final-number scoring) and the LLM-Adapters
loaders of SIQA, ARC-Challenge and BoolQ, on fixtures written here (and on ../shared/data when present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lofit.errors import DataError, LofitError
from lofit.evaluation.extraction import extract, matches
from lofit.tasks import load_task
from lofit.tasks.download import SOURCES
from lofit.tasks.numbers import canonical_number


def write_svamp(root: Path, count: int = 1000) -> None:
    folder = root / "svamp"
    folder.mkdir(parents=True)
    rows = [
        {
            "ID": f"chal-{i}",
            "Body": f"Dan had {i + 10} apples. He gave away {i % 7}",
            "sQuestion": "How many apples does he have?",
            "Equation": f"( {i + 10}.0 - {i % 7}.0 )",
            "lSolutions": float(i + 10 - i % 7),
            "Type": "Subtraction",
        }
        for i in range(count)
    ]
    (folder / "svamp.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_svamp_split_is_seeded_disjoint_and_recorded(tmp_path: Path) -> None:
    write_svamp(tmp_path)
    task = load_task("svamp", data_dir=tmp_path, seed=7)
    assert (len(task.train), len(task.val), len(task.test)) == (350, 350, 300)
    ids = task.info["ids"]
    assert task.info["split_seed"] == 7
    assert len(set(ids["train"]) | set(ids["val"]) | set(ids["test"])) == 1000
    again = load_task("svamp", data_dir=tmp_path, seed=7)
    other = load_task("svamp", data_dir=tmp_path, seed=8)
    assert again.info["ids"] == ids and other.info["ids"]["test"] != ids["test"]
    first = int(ids["train"][0].split("-")[1])
    record = task.train[0]
    assert (
        record["prompt"]
        == f"Q: Dan had {first + 10} apples. He gave away {first % 7} How many apples does he have?\nA:"
    )
    assert record["completion"] == f" ( {first + 10} - {first % 7} ) = {first + 10 - first % 7}"
    assert task.eval_task == "exact_match" and task.extraction == "number" and task.max_new_tokens == 32
    test_first = int(ids["test"][0].split("-")[1])
    assert task.test[0]["answers"] == [str(test_first + 10 - test_first % 7)]


def test_svamp_with_too_few_problems_names_the_fix(tmp_path: Path) -> None:
    write_svamp(tmp_path, count=20)
    with pytest.raises(DataError, match="350/350/300"):
        load_task("svamp", data_dir=tmp_path)


def test_number_extraction_scores_the_final_number() -> None:
    assert canonical_number("51.0") == "51" and canonical_number("1,000") == "1000"
    assert extract("", " ( 76 - 25 ) = 51\nQ: next", "number") == "51"
    assert extract("", " ( 76 - 25 ) = 51.0 dollars", "number") == "51"
    assert extract("", " I do not know", "number") == ""
    assert matches("51", ["51.0"], "number") and not matches("", [""], "number")
    assert not matches("25", ["51"], "number")


def test_svamp_real_file_loads_with_answers_matching_equations() -> None:
    try:
        task = load_task("svamp")  # lofit's usual data search (../shared/data, the cache, ...)
    except DataError:
        pytest.skip("SVAMP data not available (run `lofit data download svamp`)")
    assert (len(task.train), len(task.val), len(task.test)) == (350, 350, 300)
    for record in task.train[:50]:
        equation, answer = record["completion"].rsplit(" = ", 1)
        assert float(eval(equation)) == pytest.approx(float(answer))  # the gold equation gives the answer


def write_llm_adapters(root: Path, folder: str, split: str, rows: list[dict[str, str]]) -> None:
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / f"llm_adapters_{split}.json").write_text(json.dumps(rows))


def choice_row(question: str, options: list[str], answer: int) -> dict[str, str]:
    listed = " ".join(f"Answer{i}: {o}" for i, o in enumerate(options, start=1))
    keys = "/".join(f"answer{i}" for i in range(1, len(options) + 1))
    return {
        "instruction": f"Please choose the correct answer to the question: {question}\n\n{listed}\n\nAnswer format: {keys}",
        "input": "",
        "output": f"the correct answer is answer{answer}",
        "answer": f"answer{answer}",
    }


def boolq_row(question: str, answer: str) -> dict[str, str]:
    return {
        "instruction": f"Please answer the following question with true or false, question: {question}\n\nAnswer format: true/false",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def test_siqa_and_arc_challenge_load_llm_adapters_fixtures(tmp_path: Path) -> None:
    siqa = [choice_row("Tracy went home. What next?", ["sleep", "run", "eat"], 3)]
    write_llm_adapters(tmp_path, "siqa", "test", siqa)
    task = load_task("siqa", data_dir=tmp_path)
    assert task.test == [
        {"question": "Tracy went home. What next?", "choices": ["sleep", "run", "eat"], "answer": 2}
    ]
    assert task.train == [] and task.eval_task == "mc"
    arc = [choice_row("Which is hot?", ["ice", "fire", "snow", "rain"], 2)]
    write_llm_adapters(tmp_path, "arc_challenge", "train", arc)
    write_llm_adapters(tmp_path, "arc_challenge", "test", arc * 2)
    task = load_task("arc_challenge", data_dir=tmp_path)
    assert task.train == [{"prompt": "Question: Which is hot?\nAnswer:", "completion": " fire"}]
    assert len(task.test) == 2 and task.test[0]["answer"] == 1


def test_boolq_loads_and_checks_rows(tmp_path: Path) -> None:
    write_llm_adapters(tmp_path, "boolq", "train", [boolq_row("is water wet", "true")])
    write_llm_adapters(tmp_path, "boolq", "test", [boolq_row("is fire cold", "false")])
    task = load_task("boolq", data_dir=tmp_path)
    assert task.train == [{"prompt": "Question: is water wet\nAnswer:", "completion": " true"}]
    assert task.test == [{"question": "is fire cold", "choices": ["true", "false"], "answer": 1}]
    bad = boolq_row("is fire cold", "false")
    bad["output"] = "the correct answer is true"
    write_llm_adapters(tmp_path, "boolq", "test", [bad])
    with pytest.raises(LofitError, match="disagrees"):
        load_task("boolq", data_dir=tmp_path)


def test_download_sources_name_the_llm_adapters_files() -> None:
    for name, stems in {
        "siqa": ["social_i_qa/test.json"],
        "arc_challenge": ["ARC-Challenge/train.json", "ARC-Challenge/test.json"],
        "boolq": ["boolq/train.json", "boolq/test.json"],
        "svamp": ["SVAMP/SVAMP.json"],
    }.items():
        files = SOURCES[name]
        assert [f.url.split("/dataset/")[1] for f in files] == stems
        assert all(len(f.blob) == 40 and f.target.startswith(f"{name}/") for f in files)
