"""The base-model fingerprint as an adapter stores it: a few bytes per base tensor instead of ~500.

`lofit.adapters.fingerprint` computes a digest of every base tensor (shape, sum of squares, 8 signed sums,
8 samples) and compares two digests within dtype tolerances. An adapter does not need the digests' full
precision to make the same decisions, only each statistic to a fraction of its tolerance:

- the tensor names and shapes go into the config JSON, with layer numbers folded
  (`["model.layers.#.mlp.up_proj.weight", [1536, 576], "0-29"]`: 30 tensors in one entry);
- the sum of squares is stored as float32 (`base_model.sum_sq`, -1 where the digest is None: a quantised
  or offloaded tensor, not compared);
- each signed sum and each sample is stored as one byte (`base_model.codes`, [tensors, 16]): its value in
  units of its own tolerance (`SIGNED_TOL * norm` for the sums; for the samples, a logarithmic scale on which
  `SAMPLE_RTOL * |x| + SAMPLE_ATOL * rms` is one unit), rounded to a quarter unit and kept modulo 64 units.

A stored statistic is compared with a recomputed one within the tolerance of `fingerprint` plus an eighth
of it (the stored code's rounding, so that nothing the full digests accept is refused), modulo 64
tolerances. So the decisions are those of the full digests except for a difference between 1 and 1 1/4
tolerances (accepted or refused, depending on the rounding) and one within 1 1/4 tolerances of a multiple
of 64 tolerances (accepted). The latter never happens for the same weights in another dtype; for any other
tensor a statistic lands there with probability about 2.5 / 64 = 4%: a shuffled tensor (only its 8
signed sums change) passes with probability ~5e-12 (~1e-14 with the full digests), a different tensor (all
16 codes and the sum of squares change) with less than 1e-22. On SmolLM2-135M (272 tensors) the
fingerprint takes ~6 KB (5,440 B of tensors, ~560 B of names) instead of ~141 KB of JSON.

Example:
    >>> import torch
    >>> from lofit.adapters.fingerprint import tensor_digest
    >>> w = torch.randn(64, 48)
    >>> fingerprint = {"scheme": "lofit-weights-1", "tensors": {"w": tensor_digest(w)}}
    >>> stored, tensors = pack_fingerprint(fingerprint)
    >>> saved = unpack_fingerprint(stored, tensors, "adapter")["tensors"]["w"]
    >>> saved.difference(tensor_digest(w.half())), saved.difference(tensor_digest(w.t().contiguous())) != ""
    ('', True)
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..errors import AdapterLoadError
from .fingerprint import (
    FINGERPRINT_SAMPLES,
    FP16_SPACING,
    PERIODS,
    SAMPLE_ATOL,
    SAMPLE_RTOL,
    SIGNED_TOL,
    SIGNS_PER_PERIOD,
    sum_sq_difference,
)

ENCODING = "lofit-codes-1"
SUM_SQ_KEY = "base_model.sum_sq"
CODES_KEY = "base_model.codes"
FINGERPRINT_KEYS = (SUM_SQ_KEY, CODES_KEY)
STEPS = 4  # codes per tolerance: the rounding is at most 1/8 of a tolerance
PERIOD = 256  # codes kept modulo 256 = 64 tolerances (one byte)
SIGNED = len(PERIODS) * SIGNS_PER_PERIOD
CODES = SIGNED + FINGERPRINT_SAMPLES
SAMPLE_SLACK = 1 + 2**-5  # the log scale's unit vs the tolerance (see `_sample_codes`)
_INDEX = re.compile(r"(?<![0-9])(0|[1-9][0-9]*)(?![0-9])")
PLACEHOLDER = "#"
PROJECTION_FIELDS = ("projection_fingerprint", "projection_bias_fingerprint")


# ------------------------------------------------------------------------------------ scales
def _norm_and_count(shape: list[int], sum_sq: float) -> tuple[float, int]:
    return math.sqrt(max(sum_sq, 0.0)), max(math.prod(shape), 1)


def _signed_unit(norm: float, count: int) -> float:
    """The tolerance of a signed sum (`fingerprint.digest_difference`), from the saved digest."""
    return SIGNED_TOL * norm + 4 * FP16_SPACING * math.sqrt(count)


def _sample_scale(norm: float, count: int) -> float:
    """c with tolerance(x) = SAMPLE_RTOL * (|x| + c): the log scale's knee."""
    return (SAMPLE_ATOL * norm / math.sqrt(count) + 2 * FP16_SPACING) / SAMPLE_RTOL


def _signed_position(values: list[float], norm: float, count: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64) * (STEPS / _signed_unit(norm, count))


def _sample_position(values: list[float], norm: float, count: int) -> torch.Tensor:
    """Samples on a log scale whose unit is their tolerance: sign(x) ln(1 + |x| / c) / SAMPLE_RTOL, in codes."""
    x = torch.tensor(values, dtype=torch.float64)
    return x.sign() * torch.log1p(x.abs() / _sample_scale(norm, count)) * (STEPS / SAMPLE_RTOL)


def _codes(digest: dict[str, Any]) -> torch.Tensor:
    norm, count = _norm_and_count(digest["shape"], digest["sum_sq"])
    positions = torch.cat(
        [
            _signed_position(digest["signed"], norm, count),
            _sample_position(digest["samples"], norm, count),
        ]
    )
    return torch.remainder(torch.round(positions), PERIOD).to(torch.uint8)


def _wrapped(position: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The distance of `position` to the stored codes, modulo PERIOD, in [0, PERIOD / 2]."""
    return torch.remainder(position - codes.double() + PERIOD / 2, PERIOD).sub(PERIOD / 2).abs()


# ------------------------------------------------------------------------------ stored digests
class StoredDigest:
    """One tensor's digest as an adapter stores it; `difference` compares it with a fresh `tensor_digest`.

    Args:
        shape: the tensor's shape.
        sum_sq: its sum of squares (float32 precision).
        codes: uint8 [16]: the signed sums, then the samples (see the module docstring).
    """

    def __init__(self, shape: list[int], sum_sq: float, codes: torch.Tensor) -> None:
        self.shape, self.sum_sq, self.codes = shape, sum_sq, codes

    def difference(self, current: dict[str, Any]) -> str:
        """'' if `current` (a `tensor_digest`) matches within the tolerances, else which part differs."""
        if list(self.shape) != list(current["shape"]):
            return f"shape {self.shape} vs {current['shape']}"
        problem = sum_sq_difference(self.sum_sq, float(current["sum_sq"]), self.shape)
        if problem:
            return problem
        norm, count = _norm_and_count(self.shape, self.sum_sq)
        new_norm = math.sqrt(max(float(current["sum_sq"]), 0.0))
        signed = _wrapped(_signed_position(current["signed"], norm, count), self.codes[:SIGNED])
        allowed = STEPS * _signed_unit(max(norm, new_norm), count) / _signed_unit(norm, count) + 0.5
        if bool((signed > allowed + 1e-9).any()):
            return (
                f"signed sums off by up to {signed.max().item() / STEPS:.3g} tolerances "
                "(values moved: shuffled, permuted or edited)"
            )
        samples = _wrapped(_sample_position(current["samples"], norm, count), self.codes[SIGNED:])
        if bool((samples > STEPS * SAMPLE_SLACK + 0.5 + 1e-9).any()):
            return f"sampled values off by up to {samples.max().item() / STEPS:.3g} tolerances"
        return ""


# --------------------------------------------------------------------------------- tensor names
def fold_names(names: list[str], shapes: list[list[int]]) -> list[list[Any]]:
    """Names and shapes as entries [template, shape, indices]: each number in a name becomes `#`.

    Entries keep the order in which their template first appears; `unfold_names` gives the names back in
    entry order (the order of the stored table). A name holding `#` is kept as it is (indices None).

    Example:
        >>> fold_names(["a.0.w", "a.1.w", "b", "a.2.w"], [[2], [2], [3], [2]])
        [['a.#.w', [2], '0-2'], ['b', [3], '']]
    """
    entries: dict[tuple[str, tuple[int, ...], bool], list[Any]] = {}
    for name, shape in zip(names, shapes, strict=True):
        if PLACEHOLDER in name:
            entries[(name, tuple(shape), False)] = [name, list(shape), None]
            continue
        template = _INDEX.sub(PLACEHOLDER, name)
        entry = entries.setdefault((template, tuple(shape), True), [template, list(shape), []])
        entry[2].append(tuple(int(i) for i in _INDEX.findall(name)))
    return [[t, s, None if i is None else _spec(i)] for t, s, i in entries.values()]


def _spec(indices: list[tuple[int, ...]]) -> str:
    """Index tuples as 'a.b,c.d-e' (a run of consecutive last numbers folded into 'first-last')."""
    parts: list[str] = []
    runs: list[list[int]] = []  # [*prefix, first, last]
    for index in indices:
        last = runs[-1] if runs else None
        if index and last is not None and list(index[:-1]) == last[:-2] and index[-1] == last[-1] + 1:
            last[-1] = index[-1]
        else:
            runs.append([*index, index[-1]] if index else [])
    for run in runs:
        if not run:  # a name without numbers
            parts.append("")
            continue
        prefix = "".join(f"{i}." for i in run[:-2])
        parts.append(prefix + (f"{run[-2]}" if run[-2] == run[-1] else f"{run[-2]}-{run[-1]}"))
    return ",".join(parts)


def unfold_names(entries: Any, source: str, limit: int) -> tuple[list[str], list[list[int]]]:
    """The names and shapes of `fold_names`' entries; AdapterLoadError naming `source` if malformed."""
    if not isinstance(entries, list):
        raise _bad(source, "a list of [template, shape, indices] entries", entries)
    names: list[str] = []
    shapes: list[list[int]] = []
    for entry in entries:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry[1])
            and (entry[2] is None or isinstance(entry[2], str))
        ):
            raise _bad(source, "a list of [template, shape, indices] entries", entry)
        template, shape, spec = entry
        indices = [None] if spec is None else _indices(spec, template.count(PLACEHOLDER), source, limit)
        for index in indices:
            names.append(template if index is None else _fill(template, index))
            shapes.append(list(shape))
            if len(names) > limit:
                raise _bad(source, f"at most {limit} tensors (the rows of {CODES_KEY})", len(names))
    if len(set(names)) != len(names):
        raise _bad(source, "distinct tensor names", "repeated names")
    return names, shapes


def _fill(template: str, index: tuple[int, ...]) -> str:
    parts = template.split(PLACEHOLDER)
    return parts[0] + "".join(str(i) + part for i, part in zip(index, parts[1:], strict=True))


def _indices(spec: str, places: int, source: str, limit: int) -> list[tuple[int, ...] | None]:
    """Parse `_spec`'s string into index tuples of `places` numbers each."""
    out: list[tuple[int, ...] | None] = []
    for part in spec.split(",") if places else [spec]:
        match = re.fullmatch(r"((?:[0-9]+\.)*)([0-9]+)(?:-([0-9]+))?", part) if places else None
        if places == 0 and part == "":
            out.append(())
            continue
        if match is None or len(match.group(1).split(".")) != places:
            raise _bad(source, f"indices like '0-29' with {places} number(s) each", spec)
        prefix = tuple(int(i) for i in match.group(1).split(".")[:-1])
        first = int(match.group(2))
        last = int(match.group(3)) if match.group(3) is not None else first
        if last < first or last - first + len(out) > limit:
            raise _bad(source, f"indices like '0-29' with {places} number(s) each", spec)
        out.extend((*prefix, i) for i in range(first, last + 1))
    return out


def _bad(source: str, expected: str, value: Any) -> AdapterLoadError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return AdapterLoadError(
        f"{source}: field 'base_model.weights_fingerprint.tensors' must be {expected}, got {shown}; the "
        "file is damaged or was edited. Save the adapter again from its base model"
    )


# ------------------------------------------------------------------------------ pack / unpack
def pack_fingerprint(fingerprint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`weights_fingerprint(model)` as (the JSON part: scheme, encoding, folded names; the two tensors)."""
    digests = fingerprint["tensors"]
    shapes = [[] if d is None else list(d["shape"]) for d in digests.values()]  # None: not compared
    entries = fold_names(list(digests), shapes)
    names, _ = unfold_names(entries, "fingerprint", len(digests))
    sum_sq = torch.full((len(names),), -1.0, dtype=torch.float32)
    codes = torch.zeros(len(names), CODES, dtype=torch.uint8)
    for row, name in enumerate(names):
        digest = digests[name]
        if digest is not None:
            sum_sq[row] = min(float(digest["sum_sq"]), torch.finfo(torch.float32).max)
            codes[row] = _codes(digest)
    stored = {"scheme": fingerprint["scheme"], "encoding": ENCODING, "tensors": entries}
    return stored, {SUM_SQ_KEY: sum_sq, CODES_KEY: codes}


def unpack_fingerprint(
    stored: dict[str, Any], tensors: dict[str, torch.Tensor], source: str
) -> dict[str, Any]:
    """The JSON part and tensors of `pack_fingerprint` as `{"scheme", "tensors": {name: StoredDigest or None}}`."""
    if stored.get("encoding") != ENCODING:
        raise AdapterLoadError(
            f"{source}: fingerprint encoding {stored.get('encoding')!r} is not this lofit's {ENCODING!r}; "
            "save the adapter again with this lofit"
        )
    sum_sq, codes = tensors.get(SUM_SQ_KEY), tensors.get(CODES_KEY)
    if (
        sum_sq is None
        or codes is None
        or sum_sq.dtype != torch.float32
        or codes.dtype != torch.uint8
        or sum_sq.dim() != 1
        or tuple(codes.shape) != (sum_sq.numel(), CODES)
    ):
        raise AdapterLoadError(
            f"{source}: the weights file lacks the base-model fingerprint ({SUM_SQ_KEY!r} float32 [n], "
            f"{CODES_KEY!r} uint8 [n, {CODES}]); the two files do not belong together. Save the adapter again"
        )
    names, shapes = unfold_names(stored.get("tensors"), source, sum_sq.numel())
    if len(names) != sum_sq.numel():
        raise _bad(source, f"{sum_sq.numel()} tensors (the rows of {CODES_KEY})", len(names))
    digests: dict[str, StoredDigest | None] = {}
    for row, (name, shape) in enumerate(zip(names, shapes, strict=True)):
        value = float(sum_sq[row])
        digests[name] = None if value < 0 else StoredDigest(shape, value, codes[row])
    return {"scheme": stored.get("scheme"), "tensors": digests}


def pack_identity(identity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`base_model_identity(...)` as an adapter stores it: JSON fields, and the fingerprint's two tensors.

    The per-projection fingerprints are left out: the whole-model fingerprint covers those tensors.
    """
    stored = {k: v for k, v in identity.items() if k not in PROJECTION_FIELDS}
    stored["weights_fingerprint"], tensors = pack_fingerprint(identity["weights_fingerprint"])
    return stored, tensors


def unpack_identity(stored: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """The identity `check_same_base` compares: `stored` with its packed fingerprint decoded from `tensors`.

    An identity of another form (an adapter saved before the fingerprint was packed, or a damaged one) is
    returned as it is, for `check_same_base` to compare or refuse.
    """
    fingerprint = stored.get("weights_fingerprint")
    if not isinstance(fingerprint, dict) or "encoding" not in fingerprint:
        return stored
    return {**stored, "weights_fingerprint": unpack_fingerprint(fingerprint, tensors, source)}
