"""Inference-Time Intervention (Li et al. 2023) on lofit's own head adapter.

ITI shifts each selected head's output z by α·σ·u at every position, where u is the unit mass-mean
direction mean(z | true) − mean(z | false) at the last token and σ the standard deviation of the
activations projected on u. A constant shift of z is exactly a LoFiT offset, so ITI is a LoFiT adapter
with frozen offsets v = α·σ·u and no training.

Following honest_llama (likenneth/honest_llama, `get_com_directions` / `get_interventions_dict`): the
directions use every labelled example given (their train + val questions), σ is the population
standard deviation (`np.std`, ddof 0) of the projections of an activation bank that needs no labels
(they use a separate one spanning all questions; pass it as `std_acts`, else `acts` is used).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.config import HeadMap, LofitConfig
from ..adapters.heads import find_output_projections
from ..adapters.model import LofitModel, get_lofit_model

HeadOffsets = dict[tuple[int, int], torch.Tensor]
TQA_ITI_TEMPLATE = "Q: {question} A: {answer}"  # honest_llama's format_truthfulqa


@dataclass(frozen=True)
class ItiDirections:
    """Per-head unit mass-mean directions `directions` [L, H, d] and projection stds `sigmas` [L, H]."""

    directions: torch.Tensor
    sigmas: torch.Tensor


def mass_mean_directions(
    acts: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    std_acts: torch.Tensor | None = None,
    unbiased: bool = False,
) -> ItiDirections:
    """Unit mass-mean direction and σ along it for every head at once.

    `acts` [N, L, H, d] last-token head outputs, `labels` [N] (1 = true/chosen, 0 = false/rejected).
    σ is the std over `std_acts` (default `acts`, all N examples) of the projections on u; `unbiased`
    picks ddof 1 (honest_llama's pyvene port) instead of ddof 0 (its original `np.std`). A head whose
    two means coincide gets u = 0, hence σ = 0 and no shift.

    >>> acts = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 0.0], [0.0, 2.0]]).reshape(4, 1, 1, 2)
    >>> d = mass_mean_directions(acts, [1, 1, 0, 0])
    >>> d.directions.flatten().tolist(), round(d.sigmas.item() ** 2, 6)
    ([0.8944271802902222, -0.4472135901451111], 1.75)
    """
    if acts.dim() != 4:
        raise ValueError(f"acts must have shape [N, layers, heads, head_dim], got {tuple(acts.shape)}")
    label_tensor = torch.as_tensor(labels).to(device=acts.device).flatten()
    if label_tensor.shape[0] != acts.shape[0]:
        raise ValueError(f"labels has {label_tensor.shape[0]} entries but acts has {acts.shape[0]} examples")
    if not torch.all((label_tensor == 0) | (label_tensor == 1)):
        raise ValueError("labels must be 0 (false/rejected) or 1 (true/chosen)")
    is_true = label_tensor.bool()
    if is_true.all() or not is_true.any():
        raise ValueError("ITI needs examples of both labels (1 = true and 0 = false); got only one kind")
    # float64 statistics: means of many nearly equal fp32 activations lose digits otherwise.
    values = acts.double()
    difference = values[is_true].mean(0) - values[~is_true].mean(0)  # [L, H, d]
    norm = difference.norm(dim=-1, keepdim=True)
    directions = torch.where(norm > 0, difference / norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    bank = values if std_acts is None else std_acts.to(acts.device).double()
    if bank.dim() != 4 or bank.shape[1:] != acts.shape[1:]:
        raise ValueError(
            f"std_acts must have shape [M, {', '.join(map(str, acts.shape[1:]))}], got {tuple(bank.shape)}"
        )
    if bank.shape[0] < (2 if unbiased else 1):
        raise ValueError("std_acts needs at least one example (two with unbiased=True)")
    projections = torch.einsum("nlhd,lhd->nlh", bank, directions)
    sigmas = projections.std(dim=0, correction=1 if unbiased else 0)
    return ItiDirections(directions.float(), sigmas.float())


def _head_pairs(heads: HeadMap | Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    if isinstance(heads, Mapping):
        return [(int(layer), int(head)) for layer, layer_heads in heads.items() for head in layer_heads]
    return [(int(layer), int(head)) for layer, head in heads]


def iti_offsets(
    directions: torch.Tensor,
    sigmas: torch.Tensor,
    heads: HeadMap | Iterable[tuple[int, int]],
    alpha: float,
) -> HeadOffsets:
    """{(layer, head): α·σ·u} for the selected heads (a `{layer: [heads]}` map or (layer, head) pairs)."""
    pairs = sorted(set(_head_pairs(heads)))
    if not pairs:
        raise ValueError("heads selects no head; pass at least one (layer, head)")
    num_layers, num_heads = sigmas.shape
    bad = [(layer, head) for layer, head in pairs if not (0 <= layer < num_layers and 0 <= head < num_heads)]
    if bad:
        raise ValueError(
            f"heads {bad} are out of range for directions of {num_layers} layers x {num_heads} heads"
        )
    layers = torch.tensor([layer for layer, _ in pairs], device=sigmas.device)
    index = torch.tensor([head for _, head in pairs], device=sigmas.device)
    shifts = alpha * sigmas[layers, index, None] * directions[layers, index]  # [K, d]
    return {pair: shift for pair, shift in zip(pairs, shifts.detach().clone().unbind(0), strict=True)}


def apply_iti(
    base_model: nn.Module,
    offsets: HeadOffsets,
    adapter_name: str = "iti",
    target_modules: list[str] | None = None,
) -> LofitModel:
    """A frozen LoFiT offset adapter that adds `offsets` to the heads' z at every position.

    `base_model` may already be a LofitModel: the adapter is then (re)placed under `adapter_name` and made
    active, so an α sweep reuses one wrapped model.
    """
    if not offsets:
        raise ValueError("offsets is empty; pass at least one (layer, head) shift")
    heads: HeadMap = {}
    for layer, head in offsets:
        heads.setdefault(layer, []).append(head)
    config = LofitConfig(
        heads=heads, use_scale=False, use_offset=True, init_std=0.0, target_modules=target_modules
    )
    if isinstance(base_model, LofitModel):
        model = base_model
        if adapter_name in model.adapter_names:
            model.delete_adapter(adapter_name)
        model.add_adapter(adapter_name, config)
        model.set_adapter(adapter_name)
    else:
        model = get_lofit_model(base_model, config, adapter_name)
    model.set_head_params({pair: {"offset": shift} for pair, shift in offsets.items()}, adapter_name)
    for param in model.adapter_parameters(adapter_name):
        param.requires_grad_(False)  # ITI is not trained
    return model


# ------------------------------------------------------------------------------ data and activations
def iti_records(records: Sequence[Mapping[str, Any]], objective: str) -> list[tuple[str, int]]:
    """(text, label) pairs for ITI's probes and directions.

    "dpo" records give prompt+chosen -> 1 and prompt+rejected -> 0 (joined without a separator, as the
    DPO objective scores them). "truthfulqa_mc" records give "Q: {question} A: {answer}" for every correct
    (1) and incorrect (0) answer, as honest_llama does for the training questions.
    """
    pairs: list[tuple[str, int]] = []
    if objective == "dpo":
        for record in records:
            pairs.append((record["prompt"] + record["chosen"], 1))
            pairs.append((record["prompt"] + record["rejected"], 0))
    elif objective == "truthfulqa_mc":
        for record in records:
            for answers, label in ((record["correct_answers"], 1), (record["incorrect_answers"], 0)):
                pairs.extend(
                    (TQA_ITI_TEMPLATE.format(question=record["question"], answer=answer), label)
                    for answer in answers
                )
    else:
        raise ValueError(
            f"ITI needs true/false examples: objective must be 'dpo' or 'truthfulqa_mc', got {objective!r} "
            "('sft' records have no negative completions)"
        )
    return pairs


def head_activations_at_last_token(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 8,
    target_modules: list[str] | None = None,
) -> torch.Tensor:
    """Every head's output z at each text's last token, as float32 [N, layers, heads, head_dim] on CPU.

    Read after any active LoFiT adapter (ITI shifts what the model actually computes).
    """
    from ..selection.activations import text_head_activations

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not texts:
        geometry = find_output_projections(model, target_modules)
        return torch.zeros((0, geometry.num_layers, geometry.num_heads, geometry.head_dim))
    return text_head_activations(
        model, tokenizer, texts, batch_size=batch_size, target_modules=target_modules, after_adapter=True
    )
