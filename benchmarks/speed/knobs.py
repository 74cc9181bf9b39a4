"""Switches for the optimisation ablations; each is a context manager that restores the model on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lofit.training import TokenScorer

from ..harness.internals import HeadVectors
from ..harness.internals import checkpointing as lofit_checkpointing
from ..harness.internals import decoder_layers as lofit_decoder_layers


@contextlib.contextmanager
def scorer_mode(scorer: TokenScorer, mode: str) -> Iterator[None]:
    """LM head at the scored positions only ("gathered") or over every position ("full")."""
    saved = scorer.mode
    scorer.mode = mode
    try:
        yield
    finally:
        scorer.mode = saved


@contextlib.contextmanager
def input_grads(model: nn.Module) -> Iterator[None]:
    """Make the embedding output require grad, so backward runs down to layer 0 whatever is adapted."""
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    handle = embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = model.get_decoder().layers  # type: ignore[operator]
    return list(layers)


@contextlib.contextmanager
def checkpointing(model: nn.Module, how: str) -> Iterator[None]:
    """Activation checkpointing of every decoder layer.

    "layers": lofit's own (`TrainingConfig.gradient_checkpointing`, `lofit.layer_checkpointing`):
    non-reentrant `torch.utils.checkpoint` per layer in eval mode, so backward still stops at the lowest
    adapted layer. "hf": transformers' own `gradient_checkpointing_enable()`, which also makes the
    embedding output require grad (backward then always reaches layer 0); HF layers checkpoint only in
    training mode and the trainer runs the model in eval mode, so the layers alone (not their
    submodules, to keep dropout off) are flagged as training here.
    """
    if how == "layers":
        with lofit_checkpointing(lofit_decoder_layers(model)):
            yield
        return
    if how != "hf":
        raise ValueError(f"checkpointing must be 'off', 'layers' or 'hf', got {how!r}")
    layers = decoder_layers(model)
    model.gradient_checkpointing_enable()  # type: ignore[operator]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False
        model.gradient_checkpointing_disable()  # type: ignore[operator]
        model.disable_input_require_grads()  # type: ignore[operator]


def loop_head_forward(self: HeadVectors, hidden: torch.Tensor) -> torch.Tensor:
    """The naive head op: split the projection input into heads and edit them one by one in Python."""
    parts = list(hidden.split(self.head_dim, dim=-1))
    for row, head in enumerate(self.heads.tolist()):
        part = parts[head]
        if self.scale is not None:
            part = (part.float() * (1.0 + self.scale[row])).to(hidden.dtype)
        if self.offset is not None:
            part = part + self.offset[row].to(hidden.dtype)
        parts[head] = part
    return torch.cat(parts, dim=-1)


@contextlib.contextmanager
def head_op(kind: str) -> Iterator[None]:
    """Replace `HeadVectors.forward` for every adapter ("loop": the naive per-head version)."""
    if kind != "loop":
        raise ValueError(f"head_op must be 'vectorised' or 'loop', got {kind!r}")
    saved = HeadVectors.forward
    HeadVectors.forward = loop_head_forward
    try:
        yield
    finally:
        HeadVectors.forward = saved


@contextlib.contextmanager
def compiled_layers(model: nn.Module, **options: Any) -> Iterator[None]:
    """`torch.compile` every decoder layer in place (graphs are cached across switches)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(**options)
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None


@contextlib.contextmanager
def attention(model: nn.Module, implementation: str) -> Iterator[None]:
    """Run with this attention implementation ("eager", "sdpa"), then restore the model's own."""
    saved = model.config._attn_implementation  # type: ignore[union-attr]
    if implementation != saved:
        model.set_attn_implementation(implementation)  # type: ignore[operator]
    try:
        yield
    finally:
        if implementation != saved:
            model.set_attn_implementation(saved)  # type: ignore[operator]


@contextlib.contextmanager
def weights_dtype(params: list[nn.Parameter], dtype_name: str) -> Iterator[None]:
    """Hold the frozen base weights in another dtype for the duration (bf16 -> fp32 -> bf16 is exact)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    saved = [p.dtype for p in params]
    for param in params:
        param.data = param.data.to(dtype)
    try:
        yield
    finally:
        for param, original in zip(params, saved, strict=True):
            param.data = param.data.to(original)
