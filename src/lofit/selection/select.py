"""Step 1 of LoFiT: rank every attention head (`select_heads`); the result is a `HeadSelection`.

`select_heads` validates the records and options, then runs the selector that
`lofit.selection.selectors.SELECTORS` names for `method` ("lofit", "random", "probe", "gradient",
"gradient-adam"; one module each). The base model is handed back exactly as it came (weights bit-identical,
same requires_grad, mode, device).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..adapters.base_state import check_plain_model
from ..adapters.config import LofitConfig
from ..adapters.heads import HeadGeometry, find_output_projections
from ..tasks.defaults import SELECT_HEADS_DEFAULTS
from ..tasks.records import Record, train_val_records
from ..training.settings import TrainingConfig
from .ranking import HeadSelection, rank_heads
from .selectors import SELECTORS, SelectionRequest, check_method, load_selector

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def select_heads(
    base_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_data: Any,
    method: str = "lofit",
    objective: str = "sft",
    **train_kwargs: Any,
) -> HeadSelection:
    """Step 1 of LoFiT: rank every attention head of `base_model` for the task in `train_data`.

    Args:
        base_model: a plain Hugging Face causal LM; handed back exactly as it came.
        tokenizer: its tokenizer.
        train_data: records {"prompt", "completion"} (SFT) or {"prompt", "chosen", "rejected"} (DPO).
        method: a name in `lofit.selection.selectors.SELECTORS`: "lofit" (L1-regularised scales, ranked
            by ‖A‖₂), "probe" (ITI-style probes), "random", "gradient" or "gradient-adam" (one gradient
            pass at A = 0; see `lofit.selection.gradient`).
        objective: "sft" or "dpo".
        **train_kwargs: `val_data`, `probe_l2` (1.0, method "probe"), `target_modules` and the
            `TrainingConfig` fields (epochs=5, batch_size=8, lr=5e-3, l1=5e-4, beta=0.5, max_length,
            seed=42, grad_accum, precision, init_std=1e-3, output_dir, ...). Methods "random" and "probe"
            accept the training options and ignore those they do not use.

    Returns:
        The `HeadSelection`: every head's score and the ranking; `.top(k)` gives the heads for step 2.
    """
    check_method(method)
    val_data = train_kwargs.pop("val_data", None)
    probe_l2 = float(train_kwargs.pop("probe_l2", 1.0))
    target_modules = train_kwargs.pop("target_modules", None)
    config = TrainingConfig.from_kwargs(train_kwargs, owner="select_heads", **SELECT_HEADS_DEFAULTS)
    check_plain_model(base_model, "select_heads")
    records, val_records = train_val_records(train_data, val_data, objective)
    target_modules = LofitConfig(target_modules=target_modules).target_modules  # validated
    geometry = find_output_projections(base_model, target_modules)
    request = SelectionRequest(
        base_model,
        tokenizer,
        records,
        val_records,
        objective,
        config,
        geometry,
        target_modules,
        probe_l2,
        _selection_metadata(method, objective, records, val_records, geometry, config, target_modules),
    )
    result = load_selector(method)(request)
    return HeadSelection(
        result.scores, rank_heads(result.scores, result.tiebreak), method, request.metadata, result.history
    )


def _selection_metadata(
    method: str,
    objective: str,
    records: list[Record],
    val_records: list[Record] | None,
    geometry: HeadGeometry,
    config: TrainingConfig,
    target_modules: list[str] | None,
) -> dict[str, Any]:
    """What heads.json records about how a selection was made."""
    metadata: dict[str, Any] = {
        "objective": objective,
        "num_train": len(records),
        "num_val": len(val_records or []),
        "model_type": geometry.model_type,
        "score": SELECTORS[method].score,
        "settings": {k: v for k, v in vars(config).items() if k not in ("output_dir", "progress")},
    }
    if target_modules is not None:
        metadata["target_modules"] = target_modules
    return metadata
