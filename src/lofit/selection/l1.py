"""Selector "lofit" (the paper's step 1): train a scale A on every head with an L1 penalty, rank by ‖A‖₂.

Example:
    >>> from lofit.selection.selectors import SELECTORS
    >>> SELECTORS["lofit"].module
    'l1'
"""

from __future__ import annotations

import torch

from ..adapters.base_state import preserved_base_model
from ..adapters.config import LofitConfig
from ..adapters.heads import HeadGeometry
from ..adapters.model import LofitModel, get_lofit_model
from ..training.distributed import seed_everything
from ..training.encoding import max_positions
from ..training.loop import train_adapter
from ..training.losses import encode_train_val
from .selectors import SelectionRequest, SelectorScores


def select(request: SelectionRequest) -> SelectorScores:
    """Scores: each head's ‖A‖₂ after L1-regularised training of the scales (λ = `config.l1`)."""
    config = request.config
    task, train_examples, val_examples = encode_train_val(
        request.objective,
        request.tokenizer,
        request.records,
        request.val_records,
        config.max_length,
        config.beta,
        max_positions(request.base_model),
    )
    with preserved_base_model(request.base_model):
        seed_everything(config.seed)
        adapter = LofitConfig(
            heads=None,
            use_scale=True,
            use_offset=False,
            init_std=config.init_std,
            target_modules=request.target_modules,
        )
        model = get_lofit_model(request.base_model, adapter)
        try:
            scales = model.adapter_parameters(kind="scale")
            l1 = config.l1

            def penalty() -> torch.Tensor:  # λ Σ|A| over every element of every head's scale
                return l1 * torch.stack([scale.abs().sum() for scale in scales]).sum()

            history = train_adapter(
                model,
                task,
                train_examples,
                config,
                val_examples=val_examples,
                regularizer=penalty if l1 > 0 else None,
                description="select heads",
            )
            scores = _scale_norms(model, model.geometry)
        finally:
            model.unload()
    return SelectorScores(scores, history=history.to_dict())


def _scale_norms(model: LofitModel, geometry: HeadGeometry) -> torch.Tensor:
    scores = torch.zeros(geometry.num_layers, geometry.num_heads)
    for layer, vectors in model.adapter_vectors().items():
        assert vectors.scale is not None
        scores[layer, vectors.heads.cpu()] = vectors.scale.detach().float().norm(dim=-1).cpu()
    return scores
