"""The identity of a base model that an adapter records, and the check that a base model matches it.

An adapter stores the base model's type, sizes, architecture fields and a fingerprint of EVERY parameter
tensor; loading it onto another model raises `BaseModelMismatchError` instead of silently applying offsets
learned for different weights.

The per-tensor digest (`tensor_digest`, scheme `lofit-weights-1`) is cheap and dtype-tolerant:

- `shape`, compared exactly;
- `samples`: 8 evenly spaced values;
- `sum_sq`: the sum of squares of all values (catches rescaling, noise, most edits);
- `signed`: 8 signed sums over all values, sum_i b(i mod m) x_i with pseudo-random signs b for two prime
  periods m (251, 241). A shuffle, a row or column permutation or a transpose of a square matrix moves
  values between residue classes and changes them by about sqrt(2 sum_sq); the 8 sums differ after a full
  shuffle with probability about 1 - 1e-14, even if the shuffle keeps the sampled entries in place.

Comparisons allow for the rounding of the same weights loaded in another floating dtype (bf16, fp16,
fp32): a signed sum may move by ~0.8 * 2^-8 * sqrt(sum_sq) (one standard deviation) between bf16 and fp16, and
is accepted within 2^-5 * sqrt(sum_sq) (~10 standard deviations); `sum_sq` within 2^-5 relative (above
the worst case of the rounding); samples within 2^-7 relative. Computing it reads each tensor once, in
chunks converted to float32 (sums across chunks in float64, float32 on MPS): about 1.5-2 ns per value on
one CPU thread (SmolLM2-135M: ~0.3 s; a 7B model ~12 s on one thread), far less on a GPU.

What it catches: another model or checkpoint, any tensor added, removed or reshaped, weights merged,
fine-tuned, re-initialised or scaled (beyond the dtype slack), a shuffled or transposed tensor, a changed
architecture field (`ARCHITECTURE_FIELDS`). What it cannot catch: edits smaller than the dtype slack (a
few values changed or swapped in a large tensor, a fine-tuning step whose update changes sum_sq by < 3%
and each signed sum by < 3% of sqrt(sum_sq)), permutations that keep every value's position modulo both
periods (a shift by a multiple of 60491 values), and quantised (packed integer) or offloaded (meta)
tensors, which are skipped. It is no security check: a base forged to match the statistics passes.
Adapters saved before the whole-model fingerprint (only `projection_fingerprint`), or with another
fingerprint scheme, are refused with a message saying to save them again with this lofit. Adapters store the
digests in 20 bytes per tensor (`lofit.adapters.fingerprint_store`); `digest_difference` compares such a
stored digest with a fresh one as well.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterLoadError, BaseModelMismatchError
from .folding import innermost
from .heads import projection_weight_matrix, text_config

FINGERPRINT_SAMPLES = 8
FINGERPRINT_RTOL = 0.02
DTYPE_RTOL = 2**-7  # twice bf16's rounding error

WEIGHTS_SCHEME = "lofit-weights-1"
PERIODS = (251, 241)  # primes: a row/column permutation moves values between residue classes
SIGNS_PER_PERIOD = 4
CHUNK = 251 * 241 * 8  # values per chunk on CPUs: a multiple of both periods (float32 sums stay exact
# to < 2^-5 even in the worst case of rounding: 484k * 2^-24 < 2^-5)
SIGNED_TOL = 2**-5  # x sqrt(sum_sq)
SUM_SQ_RTOL = 2**-5
SAMPLE_RTOL = 2**-7
SAMPLE_ATOL = 2**-10  # x the tensor's root mean square
FP16_SPACING = 2**-24  # absolute rounding of fp16's subnormal values (below 6e-5)
ARCHITECTURE_FIELDS = (
    "hidden_act", "activation_function", "intermediate_size", "n_inner", "ffn_dim", "num_attention_heads",
    "num_key_value_heads", "num_hidden_layers", "head_dim", "tie_word_embeddings", "attention_bias",
    "mlp_bias", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon",
)  # fmt: skip
SIZE_FIELDS = ("model_type", "num_layers", "num_heads", "head_dim", "hidden_size", "vocab_size")


# ------------------------------------------------------------------------------------ digests
def projection_fingerprint(weight: torch.Tensor) -> list[float] | None:
    """[std, then FINGERPRINT_SAMPLES evenly spaced weight values]; None for packed (quantised) weights."""
    if not weight.dtype.is_floating_point or weight.device.type == "meta":
        return None
    flat = weight.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES, device=flat.device).long()
    index.clamp_(max=flat.numel() - 1)  # float32 rounds the last index up for > 2^24 values
    std = flat.float().std().item()
    return [std, *flat[index].float().tolist()]


def _signs(period: int) -> torch.Tensor:
    """SIGNS_PER_PERIOD fixed pseudo-random +-1 vectors of length `period` (an integer hash: stable)."""
    rows = [
        [
            1.0 - 2.0 * ((((r + 1) * 0x9E3779B1 + (j + 1) * 0x85EBCA77) & 0xFFFFFFFF) >> 17 & 1)
            for r in range(period)
        ]
        for j in range(SIGNS_PER_PERIOD)
    ]
    return torch.tensor(rows, dtype=torch.float64)


_SIGNS = {period: _signs(period) for period in PERIODS}


def sample_positions(count: int) -> torch.Tensor:
    """FINGERPRINT_SAMPLES evenly spaced positions in 0..count-1, first and last included (exact integers)."""
    return torch.arange(FINGERPRINT_SAMPLES, dtype=torch.int64) * (count - 1) // (FINGERPRINT_SAMPLES - 1)


def _round(value: float) -> float:
    return float(f"{value:.9g}")


def tensor_digest(tensor: torch.Tensor) -> dict[str, Any] | None:
    """The dtype-tolerant digest of one tensor (see the module docstring); None if it cannot be read.

    Args:
        tensor: a parameter; packed integer (quantised) and meta tensors give None.

    Returns:
        `{"shape", "sum_sq", "signed", "samples"}` with plain Python numbers (JSON-ready).

    Example:
        >>> w = torch.randn(64, 48)
        >>> a, b = tensor_digest(w), tensor_digest(w.to(torch.bfloat16))
        >>> digests_match(a, b), digests_match(a, tensor_digest(w[torch.randperm(64)]))
        (True, False)
    """
    if not tensor.dtype.is_floating_point or tensor.device.type == "meta" or tensor.numel() == 0:
        return None
    flat = tensor.detach().reshape(-1)
    total = torch.float32 if flat.device.type == "mps" else torch.float64  # MPS has no float64
    residues = {p: torch.zeros(p, dtype=total, device=flat.device) for p in PERIODS}
    sum_sq = torch.zeros((), dtype=total, device=flat.device)
    step = CHUNK if flat.device.type == "cpu" else CHUNK * 64  # fewer kernel launches on accelerators
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step].float()  # float32 sums within a chunk, float64 across chunks
        sum_sq += torch.linalg.vector_norm(chunk).to(total) ** 2
        for period, sums in residues.items():
            whole = chunk.numel() // period * period
            sums += chunk[:whole].view(-1, period).sum(0).to(total)
            sums[: chunk.numel() - whole] += chunk[whole:].to(total)
    signed = torch.cat([_SIGNS[p].to(sums) @ sums for p, sums in residues.items()])
    index = sample_positions(flat.numel()).to(flat.device)
    return {
        "shape": list(tensor.shape),
        "sum_sq": _round(sum_sq.item()),
        "signed": [_round(v) for v in signed.tolist()],
        "samples": [_round(v) for v in flat[index].double().tolist()],
    }


def digests_match(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two `tensor_digest`s describe the same tensor up to floating-dtype rounding."""
    return not digest_difference(saved, current)


def sum_sq_difference(old_sq: float, new_sq: float, shape: Sequence[int]) -> str:
    """'' if two sums of squares of a tensor of `shape` match within the dtype slack, else what differs."""
    norm, count = math.sqrt(max(old_sq, new_sq, 0.0)), max(math.prod(shape), 1)
    floor = 4 * FP16_SPACING * math.sqrt(count)  # fp16 subnormals: absolute, not relative, rounding
    if not abs(old_sq - new_sq) <= SUM_SQ_RTOL * max(old_sq, new_sq) + floor * (norm + floor):
        return f"sum of squares {old_sq:.6g} vs {new_sq:.6g}"
    return ""


def digest_difference(saved: Any, current: dict[str, Any]) -> str:
    """'' if the digests match, else which part differs.

    `saved` is a `tensor_digest` or a digest as an adapter stores it (`fingerprint_store.StoredDigest`).
    """
    if not isinstance(saved, dict):  # as an adapter stores it (`lofit.adapters.fingerprint_store`)
        return str(saved.difference(current))
    if list(saved["shape"]) != list(current["shape"]):
        return f"shape {saved['shape']} vs {current['shape']}"
    old_sq, new_sq = float(saved["sum_sq"]), float(current["sum_sq"])
    problem = sum_sq_difference(old_sq, new_sq, saved["shape"])
    if problem:
        return problem
    norm, count = math.sqrt(max(old_sq, new_sq)), max(math.prod(saved["shape"]), 1)
    floor = 4 * FP16_SPACING * math.sqrt(count)  # fp16 subnormals: absolute, not relative, rounding
    for a, b in zip(saved["signed"], current["signed"], strict=True):
        if not abs(a - b) <= SIGNED_TOL * norm + floor:
            return f"signed sums {a:.6g} vs {b:.6g} (values moved: shuffled, permuted or edited)"
    rms = norm / math.sqrt(count)
    for a, b in zip(saved["samples"], current["samples"], strict=True):
        if not abs(a - b) <= SAMPLE_RTOL * max(abs(a), abs(b)) + SAMPLE_ATOL * rms + 2 * FP16_SPACING:
            return f"sampled value {a:.6g} vs {b:.6g}"
    return ""


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters that adapter wrappers (anything with a `base_layer`: LoFiT, RED, PEFT) add."""
    ids: set[int] = set()
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module):
            ids.update(id(p) for name, p in module.named_parameters() if not name.startswith("base_layer."))
    return ids


def weights_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The digest of every base-model parameter tensor, by name (adapter parameters and wrappers left out).

    Args:
        model: the base model, bare or with adapter layers injected (names are those of the bare model).

    Returns:
        `{"scheme": WEIGHTS_SCHEME, "tensors": {name: digest or None}}`.
    """
    skip = _adapter_parameter_ids(model)
    tensors = {}
    for name, param in model.named_parameters():
        if id(param) not in skip:
            tensors[name.replace(".base_layer.", ".")] = tensor_digest(param)
    return {"scheme": WEIGHTS_SCHEME, "tensors": tensors}


def architecture(config: Any) -> dict[str, Any]:
    """The config fields (of `ARCHITECTURE_FIELDS`) that `config` has, as JSON values."""
    fields = {}
    for key in ARCHITECTURE_FIELDS:
        value = getattr(config, key, None)
        if value is not None:
            fields[key] = json.loads(json.dumps(value, default=str))
    return fields


def base_model_identity(model: nn.Module, site_names: Sequence[str], **sizes: Any) -> dict[str, Any]:
    """What an adapter records of the base model it was trained on (see `check_same_base`).

    The one identity function: LoFiT adapters and RED adapters both record this, each adding the sizes of
    what it edits (LoFiT: `num_heads`, `head_dim`; RED: `width`, `sites`).

    Args:
        model: the base model (adapter layers may be injected).
        site_names: the edited projections (module names), one per edited layer.
        **sizes: the adapter kind's own size fields, stored and compared as they are.

    Returns:
        A JSON-ready dict: type, sizes, architecture fields, projection and whole-model fingerprints.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> identity = base_model_identity(base, ["model.layers.0.self_attn.o_proj"], head_dim=8)
        >>> identity["model_type"], identity["num_layers"], identity["head_dim"], len(identity["projection_fingerprint"])
        ('llama', 1, 8, 1)
    """
    config = text_config(getattr(model, "config", None))
    projections = [innermost(model.get_submodule(name)) for name in site_names]
    biases = [getattr(projection, "bias", None) for projection in projections]
    return {
        "model_type": str(getattr(config, "model_type", "unknown")),
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "hidden_size": getattr(config, "hidden_size", getattr(config, "n_embd", None)),
        "vocab_size": getattr(config, "vocab_size", None),
        "num_layers": len(projections),
        **sizes,
        "architecture": architecture(config),
        "projection_fingerprint": [projection_fingerprint(projection_weight_matrix(m)) for m in projections],
        # None = no bias. A merged offset adds or changes the bias without touching the weight.
        "projection_bias_fingerprint": [None if b is None else projection_fingerprint(b) for b in biases],
        "weights_fingerprint": weights_fingerprint(model),
    }


# -------------------------------------------------------------------------------------- checks
def check_same_base(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    """Raise BaseModelMismatchError if `current` is not the base model the adapter was saved for.

    Args:
        saved: the identity stored in the adapter (`base_model` of its config file, its fingerprint
            decoded by `fingerprint_store.unpack_identity`; or, in adapters of format 1, as JSON digests).
        current: `base_model_identity` of the model it is being loaded onto.
        source: the adapter's config file, named in the errors.

    Raises:
        AdapterLoadError: a field of `saved` has the wrong type (the file is damaged or edited).
        BaseModelMismatchError: the sizes, architecture, projections or any weight tensor differ.
    """
    validate_identity(saved, source)
    for key in SIZE_FIELDS:
        if saved.get(key) != current.get(key):
            raise BaseModelMismatchError(
                f"{source}: this adapter was trained for a {saved.get('model_type')} model "
                f"({saved.get('name_or_path') or 'unnamed'}) with {key}={saved.get(key)}, but the base model "
                f"given has {key}={current.get(key)}; load the adapter onto the base model it was trained on"
            )
    _check_architecture(saved, current, source)
    _check_projections(saved, current, source)
    if not isinstance(saved.get("weights_fingerprint"), dict):
        raise AdapterLoadError(
            f"{source} was saved by an earlier lofit build that recorded no fingerprint of the whole base "
            "model ('base_model.weights_fingerprint'); this lofit refuses such files. Train the adapter again, "
            "or load it with the lofit that saved it and save it again"
        )
    _check_weights(saved, current, source)


def _mismatch(saved: dict[str, Any], source: Path, what: str) -> BaseModelMismatchError:
    return BaseModelMismatchError(
        f"{source}: the base model's {what} differ from those this adapter was trained on "
        f"({saved.get('name_or_path') or 'unnamed'}); it is a different (or already merged or fine-tuned) "
        "model. Load the adapter onto its original base model"
    )


def _check_architecture(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    old, new = saved.get("architecture") or {}, current.get("architecture") or {}
    for key in sorted(set(old) & set(new)):  # fields of one transformers version only are not compared
        if old[key] != new[key]:
            raise BaseModelMismatchError(
                f"{source}: this adapter was trained on a base model with {key}={old[key]!r}, but the base "
                f"model given has {key}={new[key]!r}; load the adapter onto the base model it was trained on"
            )


def _check_projections(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    for layer, (old, new) in enumerate(
        zip(
            saved.get("projection_fingerprint") or [],
            current.get("projection_fingerprint") or [],
            strict=False,
        )
    ):
        if old is not None and new is not None and not _close(old, new):  # None: quantised, not comparable
            raise _mismatch(saved, source, f"attention output weights in layer {layer}")
    saved_biases = saved.get("projection_bias_fingerprint")
    if isinstance(saved_biases, list):  # absent in files from lofit versions before it was recorded
        for layer, (old, new) in enumerate(
            zip(saved_biases, current.get("projection_bias_fingerprint") or [], strict=False)
        ):
            if (old is None) != (new is None) or (old is not None and not _close(old, new)):
                raise _mismatch(saved, source, f"attention output biases in layer {layer}")


def _check_weights(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    old, new = saved["weights_fingerprint"], current.get("weights_fingerprint") or {}
    if old.get("scheme") != new.get("scheme"):
        raise AdapterLoadError(
            f"{source}: weights fingerprint scheme {old.get('scheme')!r} is not this lofit's "
            f"{new.get('scheme')!r}; train the adapter again, or save it again with this lofit"
        )
    old_tensors, new_tensors = old["tensors"], new.get("tensors") or {}
    problems = [f"tensor {name} is missing" for name in old_tensors if name not in new_tensors]
    problems += [f"tensor {name} is extra" for name in new_tensors if name not in old_tensors]
    for name, digest in old_tensors.items():
        other = new_tensors.get(name)
        if digest is not None and other is not None:  # None: quantised or offloaded, not comparable
            difference = digest_difference(digest, other)
            if difference:
                problems.append(f"tensor {name} differs ({difference})")
    if problems:
        more = f" and {len(problems) - 1} more tensor(s)" if len(problems) > 1 else ""
        raise _mismatch(saved, source, f"weights ({problems[0]}{more})")


def _close(old: list[float], new: list[float]) -> bool:
    # Absolute slack relative to the spread, plus relative slack for bf16/fp16 rounding of large values,
    # so the same model loaded in another dtype still matches while any other model does not.
    spread = FINGERPRINT_RTOL * max(abs(old[0]), 1e-12)
    return len(old) == len(new) and all(
        abs(a - b) <= spread + DTYPE_RTOL * abs(a) for a, b in zip(old, new, strict=True)
    )


# ---------------------------------------------------------------------------------- validation
def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _numbers(value: Any, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and all(_is_number(v) for v in value)
        and (length is None or len(value) == length)
    )


def _fingerprint_list(value: Any) -> bool:
    return isinstance(value, list) and all(v is None or (_numbers(v) and v) for v in value)


def _digest_ok(value: Any) -> bool:
    if value is None or callable(getattr(value, "difference", None)):  # None, or decoded and checked
        return True
    return (
        isinstance(value, dict)
        and isinstance(value.get("shape"), list)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value["shape"])
        and _is_number(value.get("sum_sq"))
        and _numbers(value.get("signed"), len(PERIODS) * SIGNS_PER_PERIOD)
        and _numbers(value.get("samples"), FINGERPRINT_SAMPLES)
    )


def _bad_field(source: Path, field: str, expected: str, value: Any) -> AdapterLoadError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return AdapterLoadError(
        f"{source}: field 'base_model.{field}' must be {expected}, got {shown}; the file is damaged or was "
        "edited. Save the adapter again from its base model"
    )


def validate_identity(saved: dict[str, Any], source: Path) -> None:
    """Raise AdapterLoadError naming `source` and the field if a stored identity has the wrong types."""
    for key in ("model_type", "name_or_path"):
        if key in saved and not isinstance(saved[key], str):
            raise _bad_field(source, key, "a string", saved[key])
    for key in SIZE_FIELDS[1:]:
        value = saved.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise _bad_field(source, key, "an integer", value)
    if "architecture" in saved and not isinstance(saved["architecture"], dict):
        raise _bad_field(source, "architecture", "an object", saved["architecture"])
    if not _fingerprint_list(saved.get("projection_fingerprint", [])):
        raise _bad_field(
            source,
            "projection_fingerprint",
            "a list of number lists or nulls",
            saved["projection_fingerprint"],
        )
    bias = saved.get("projection_bias_fingerprint")
    if bias is not None and not _fingerprint_list(bias):
        raise _bad_field(source, "projection_bias_fingerprint", "a list of number lists or nulls", bias)
    weights = saved.get("weights_fingerprint")
    if weights is None:
        return
    if not isinstance(weights, dict) or not isinstance(weights.get("tensors"), dict):
        raise _bad_field(source, "weights_fingerprint", 'an object with "scheme" and "tensors"', weights)
    for name, digest in weights["tensors"].items():
        if not _digest_ok(digest):
            raise _bad_field(
                source,
                f"weights_fingerprint.tensors.{name}",
                "null or {shape, sum_sq, signed, samples}",
                digest,
            )
