"""The one module through which benchmarks reach lofit below its public API.

Benchmarks use `lofit` and its subpackages' exports (`lofit.training`, `lofit.baselines`, `lofit.tasks`,
...) like any user. A few measurements need more: the training loop's own optimizer step (so that the
speed benchmark times exactly what `train_offsets` runs, not a copy), the pieces a speed ablation swaps
out, or a file-safety helper. Those names are imported here, and only here
(tests/benchmarks/test_entry_points.py checks it), so a change of lofit's internals touches one benchmark file.

| name | from | why a benchmark needs it |
|---|---|---|
| `atomic_write_json`, `atomic_write_text`, `atomic_write_with` | `lofit.io.atomic` | results survive a kill mid-write |
| `output_lock`, `OutputLockedError` | `lofit.io.locking` | two runs on one results file |
| `HeadMap` | `lofit.adapters.config` | the type of a head set |
| `find_output_projections` | `lofit.adapters.heads` | the o_proj sites (probe, ITI) |
| `HeadVectors` | `lofit.adapters.layer` | speed ablation: per-head loop vs vectorised op |
| `add_contiguous_input_hook`, `remove_contiguous_input_hook` | `lofit.adapters.lm_head` | speed: the LM-head hook's effect |
| `optimizer_step`, `TrainingRun`, `LoopState`, `LoopPosition`, `make_accelerator` | `lofit.training` internals | speed: one real training step |
| `epoch_batches` | `lofit.training.batching` | speed: the loop's length-grouped batches |
| `mean_loss` | `lofit.training.losses` | validation loss after training only |
| `checkpointing`, `decoder_layers` | `lofit.training.activation_checkpointing` | speed: checkpointing variants |
| `rank_heads`, `probe_texts` | `lofit.selection.select` | Table 2's alternative head choices |
| `probe_head_scores` | `lofit.selection.probe` | Table 2's probe-selected heads |
| `offset_logit_lens`, `logit_lens_markdown` | `lofit.evaluation.logit_lens` | App. E's logit lens |
| `benchmark_dir` | `lofit.tasks.datadir` | speed: raw TruthfulQA rows |
| `find_red_sites` | `lofit.baselines.red` | RED's layers per method |
| `residual_scale` | `lofit.baselines.repe` | RepE's shift size |
| `save_adapter`, `CONFIG_NAME` | `lofit.adapters.persistence` | vllm_serving: 1,000 adapter folders written without a model each |
| `bundled_checkpoint` | `lofit.io.bundled` | vllm_serving: the bundled model's safetensors folder for vLLM |
| `truthfulqa_mc_requests`, `load_prompt_parts` | `lofit.evaluation.truthfulqa_mc` | lm_eval_compare: the exact TruthfulQA MC requests lofit scores, handed to lm-eval too |
| `evaluation_precision` | `lofit.evaluation.precision` | lm_eval_compare: lofit's bf16 autocast, set like lm-eval's |
| `shared_length`, `common_prefix_length` | `lofit.evaluation.packed`, `lofit.training.tokens` | lm_eval_compare: the tokens lofit's packed scorer runs once |
| `LofitEngine` | `lofit.integrations.vllm.engine` | vllm_serving: the engine measured (imports vLLM only when built) |
"""

from __future__ import annotations

from lofit.adapters.config import HeadMap
from lofit.adapters.heads import find_output_projections
from lofit.adapters.layer import HeadVectors
from lofit.adapters.lm_head import add_contiguous_input_hook, remove_contiguous_input_hook
from lofit.adapters.persistence import CONFIG_NAME, save_adapter
from lofit.baselines.red import find_red_sites
from lofit.baselines.repe import residual_scale
from lofit.evaluation.logit_lens import logit_lens_markdown, offset_logit_lens
from lofit.evaluation.packed import shared_length
from lofit.evaluation.precision import evaluation_precision
from lofit.evaluation.truthfulqa_mc import _requests as truthfulqa_mc_requests
from lofit.evaluation.truthfulqa_mc import load_prompt_parts
from lofit.integrations.vllm.engine import LofitEngine
from lofit.io.atomic import atomic_write_json, atomic_write_text, atomic_write_with
from lofit.io.bundled import bundled_checkpoint
from lofit.io.locking import OutputLockedError, output_lock
from lofit.selection.probe import probe_head_scores, probe_texts
from lofit.selection.ranking import rank_heads
from lofit.tasks.datadir import benchmark_dir
from lofit.training.activation_checkpointing import checkpointing, decoder_layers
from lofit.training.batching import epoch_batches
from lofit.training.checkpoints import LoopPosition
from lofit.training.distributed import make_accelerator
from lofit.training.losses import mean_loss
from lofit.training.run_state import LoopState, TrainingRun
from lofit.training.step import optimizer_step
from lofit.training.tokens import common_prefix_length

__all__ = [
    "CONFIG_NAME",
    "HeadMap",
    "HeadVectors",
    "LofitEngine",
    "LoopPosition",
    "LoopState",
    "OutputLockedError",
    "TrainingRun",
    "add_contiguous_input_hook",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_with",
    "benchmark_dir",
    "bundled_checkpoint",
    "checkpointing",
    "common_prefix_length",
    "decoder_layers",
    "epoch_batches",
    "evaluation_precision",
    "find_output_projections",
    "find_red_sites",
    "load_prompt_parts",
    "logit_lens_markdown",
    "make_accelerator",
    "mean_loss",
    "offset_logit_lens",
    "optimizer_step",
    "output_lock",
    "probe_head_scores",
    "probe_texts",
    "rank_heads",
    "remove_contiguous_input_hook",
    "residual_scale",
    "save_adapter",
    "shared_length",
    "truthfulqa_mc_requests",
]
