"""Write a merged model as a plain transformers checkpoint (`lofit merge`, `export_merged`).

A merged model from `LofitModel.merge_and_unload()` (or `RedModel.merge_and_unload()`) is already what
its config says (`lofit.adapters.merged`), so its own `save_pretrained` is enough; `export_merged` adds the checks
and the atomic write: it refuses a model whose saved form would drop parameters or leave some random,
and never leaves a partial directory.

Example:
    >>> import tempfile
    >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    >>> from lofit import LofitConfig, get_lofit_model
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> merged = get_lofit_model(base, LofitConfig(heads={0: [1]}, init_std=0.1)).merge_and_unload()
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     reloaded = AutoModelForCausalLM.from_pretrained(export_merged(merged, tmp))
    >>> reloaded.config.attention_bias
    True
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.merged import check_complete
from ..adapters.model import LofitModel
from ..io.atomic import atomic_directory, check_replaceable, write_guard


def export_merged(
    merged: nn.Module,
    path: str | os.PathLike[str],
    tokenizer: object | None = None,
    *,
    overwrite: bool = False,
    overwrite_option: str = "overwrite=True",
) -> Path:
    """Save a merged model (from `merge_and_unload`) as a checkpoint that plain transformers loads.

    Args:
        merged: the merged model.
        path: the output directory, never a symbolic link nor the folder the model was loaded from. The
            files are written into a temporary directory and swapped in only once all are complete; a
            checkpoint lofit wrote there before is replaced whole, files that are no model content (notes)
            are kept.
        tokenizer: saved alongside when given.
        overwrite: replace model files in `path` that lofit did not write (another model); without it
            such a folder is refused.
        overwrite_option: how the caller spells `overwrite`, for the message.

    Returns:
        `path` as a `Path`.

    Raises:
        MergeError: the checkpoint would not reload as this model (nothing is written then).
        ForeignContentError: `path` holds another model and not `overwrite`.
        InputOverwriteError: `path` is, contains or lies inside the folder the model was loaded from.
    """
    directory = Path(path)
    check_complete(merged)
    source = getattr(getattr(merged, "config", None), "_name_or_path", None)
    local = source if isinstance(source, str) and source and Path(source).expanduser().is_dir() else None
    guard = write_guard({"the base model's folder": local}, option="path")
    folder = atomic_directory(
        directory, policy="model", overwrite=overwrite, overwrite_option=overwrite_option
    )
    with guard, folder as tmp:
        merged.save_pretrained(str(tmp))  # type: ignore[operator]  # safetensors by default
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))  # type: ignore[attr-defined]
    return directory


def merge_adapter_checkpoint(
    base: str,
    adapter_dir: str,
    out_dir: str,
    dtype: torch.dtype | str | None = None,
    *,
    overwrite: bool = False,
    overwrite_option: str = "overwrite=True",
    progress: bool = False,
) -> Path:
    """Load `base` (see `load_model`), fold the adapter saved in `adapter_dir` into it, export to `out_dir`.

    The result (weights, config, tokenizer) loads with plain `AutoModelForCausalLM.from_pretrained`; for
    Mistral, Qwen2 and Phi-3 bases with offsets it is the equivalent `LlamaForCausalLM`. The arguments are
    checked before anything is loaded, as `lofit merge` checks them.

    Args:
        base: a Hugging Face id, a local path or "smollm2-135m".
        adapter_dir: the directory written by `LofitModel.save_pretrained`.
        out_dir: where to write the merged checkpoint: never one of the inputs (links resolved), never a
            symbolic link; holding another model only with `overwrite` (see `export_merged`).
        dtype: load (and so save) the base in this dtype; None keeps the checkpoint's.
        overwrite: replace another model found in `out_dir`.
        overwrite_option: how the caller spells `overwrite`, for the message.
        progress: show a progress bar over the steps (load, check and fold, write).

    Returns:
        `out_dir` as a `Path`.

    Raises:
        InputOverwriteError, LinkedOutputError, ForeignContentError: `out_dir` cannot be written safely.
    """
    from ..io.loading import load_model

    local_base = base if Path(base).expanduser().exists() else None
    inputs = {"base": local_base, "adapter_dir": adapter_dir}
    with write_guard(inputs, option="out_dir"):
        check_replaceable(out_dir, overwrite, overwrite_option)  # before the (slow) load and merge
        with tqdm(total=3, desc="lofit merge", unit="step", disable=not progress) as bar:
            bar.set_postfix_str("loading the base model")
            model, tokenizer = load_model(base, dtype=dtype)
            bar.update()
            bar.set_postfix_str("checking the base and folding the adapter")
            merged = LofitModel.from_pretrained(model, adapter_dir).merge_and_unload()
            bar.update()
            bar.set_postfix_str(f"writing {out_dir}")
            written = export_merged(
                merged, out_dir, tokenizer, overwrite=overwrite, overwrite_option=overwrite_option
            )
            bar.update()
        return written
