"""Score the adapters an out-of-domain run rebuilt on their source task (TruthfulQA fold 0, test).

`python -m benchmarks.paper --stages ood` on a fresh checkout retrains the TruthfulQA LoFiT / LoRA adapters (and
refits ITI's probes) from their cached units, because the work dir is not committed. This script checks
how close a rebuilt adapter is to the unit it was rebuilt from: it evaluates the saved files of the work
dir on TruthfulQA's fold-0 test set, as Tables 1 and 3 did, and prints them beside the units' scores. It
writes nothing into the results file.

    python -m benchmarks.paper.check_ood --results benchmarks/results/paper_scale \\
        --work-dir /work/paper_full/work --methods lora lofit
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ..harness.units import Harness, Settings
from .units import ood_model, ood_source_units


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, required=True, help="folder of paper_tables.json")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument(
        "--methods", nargs="+", default=["lofit", "lora", "iti"], choices=["lofit", "lora", "iti"]
    )
    args = parser.parse_args(argv)
    stored = json.loads((args.results / "paper_tables.json").read_text(encoding="utf-8"))
    settings = Settings(**stored["settings"])
    with tempfile.TemporaryDirectory() as scratch:  # a copy: this check never writes the results file
        copy = Path(scratch) / "paper_tables.json"
        copy.write_text(json.dumps(stored), encoding="utf-8")
        h = Harness(settings, copy, args.work_dir, float("inf"))
        for method in args.methods:
            unit_name, file_name = ood_source_units(h)[method]
            path = args.work_dir / file_name
            if not path.is_file():
                raise SystemExit(
                    f"no {path}: run `python -m benchmarks.paper --stages ood` with this --work-dir first"
                )
            model, tok = ood_model(h, method, path)
            scores = h.evaluate(model, tok, "truthfulqa", 0, "test")
            print(
                json.dumps(
                    {"method": method, "rebuilt": scores, unit_name: stored["units"][unit_name]["test"]}
                )
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
