"""Logit lens of a saved LoFiT adapter's offsets (the paper's App. E): top tokens per head, as markdown.

    python -m benchmarks.logit_lens ADAPTER_DIR [--model smollm2-135m] [--top-k 10] [--out FILE]

ADAPTER_DIR is what `lofit run` / `model.save_pretrained` wrote. The paper reads CLUTRR heads as family
words and TruthfulQA heads as hedging words; this prints what the bundled model's offsets decode to.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lofit import LofitModel, load_model

from .harness.internals import atomic_write_text, logit_lens_markdown, offset_logit_lens


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("adapter", type=Path, help="folder written by save_pretrained / lofit run")
    parser.add_argument("--model", default="smollm2-135m", help="the adapter's base model")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--heads", type=int, default=None, help="only the heads with the largest ‖v‖")
    parser.add_argument("--out", type=Path, default=None, help="write the table here (default: print)")
    args = parser.parse_args(argv)
    base, tokenizer = load_model(args.model)
    model = LofitModel.from_pretrained(base, args.adapter)
    text = logit_lens_markdown(offset_logit_lens(model, tokenizer, top_k=args.top_k), limit=args.heads)
    if args.out is None:
        print(text)
    else:
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
