"""lofit's benchmarks: each one a module or package run with `python -m benchmarks.<name>`.

Run them from the repository root with lofit importable (`pip install -e .`, or `PYTHONPATH=src`):

| command | what it measures | results |
|---|---|---|
| `python -m benchmarks.paper` | the paper's Tables 1-3, stability, OOD, on one model | `results/paper_tables.*` |
| `python -m benchmarks.paper.check_ood` | rebuilt OOD adapters vs the units they came from | printed |
| `python -m benchmarks.curves` | Fig. 4 (data efficiency) and Fig. 5 (number of heads) | `results/curves/` |
| `python -m benchmarks.scale` | Fig. 4's protocol on two model sizes (SmolLM2-135M, Gemma 3 270M) | `results/scale/` |
| `python -m benchmarks.speed` | training / inference speed and memory vs LoRA and full fine-tuning | `results/speed*` |
| `python -m benchmarks.composition` | interference of two combined task adapters | `results/composition.*` |
| `python -m benchmarks.selector_comparison` | cheap head selectors vs step 1's L1 selection | `results/selectors/` |
| `python -m benchmarks.step2_cache` | step 2 with the lower layers cached vs LoRA | `results/step2_cache/` |
| `python -m benchmarks.mixed_batch` | one batch with a different adapter per row | `results/mixed_batch.*` |
| `python -m benchmarks.generate_overhead` | greedy generation, unmerged adapter vs base | `results/generate_overhead.json` |
| `python -m benchmarks.logit_lens ADAPTER` | top tokens of a saved adapter's offsets (App. E) | printed / `--out` |
| `python -m benchmarks.model_speed` | training tokens/s of Gemma 3 270M vs SmolLM2-135M, steps 1 and 2 | `results/model_speed.*` |
| `python -m benchmarks.vllm_serving` | vLLM plugin: 1,000 adapters; 256 requests over 100 adapters vs the base (.venv-vllm) | `results/serving.*` |

Every entry point takes `--help`, and the long ones a `--quick` smoke mode that
tests/benchmarks/ runs on a tiny random model. The pieces they share (cached units, settings, data
subsets, machine description, statistics, committing results) are in `benchmarks.harness`; benchmarks
use lofit's public API (`lofit` and its subpackages' exports) and reach anything below it only through
`benchmarks.harness.internals`.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
"""Where every benchmark writes by default, and where docs/results.md reads from."""
