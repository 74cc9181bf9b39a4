"""`LofitConfig`: which heads an adapter touches and which vectors it learns."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import LofitValueError, NotPeftError

HeadMap = dict[int, list[int]]

# Layer and head indices above this are refused before any message formats them (no model has so many;
# Python refuses to print an int of more than 4,300 digits).
MAX_INDEX = 1 << 20


NOT_PEFT_CONFIG = (
    "LofitConfig is lofit's adapter configuration, not a peft.PeftConfig: PEFT, TRL and transformers' "
    "add_adapter cannot build a LoFiT adapter. Use model = lofit.get_lofit_model(base_model, config) (PEFT's "
    "get_peft_model), then train it with transformers.Trainer or trl.SFTTrainer(model=model, ...) without "
    "peft_config, or lofit.integrations.LofitSFTTrainer(model=base_model, peft_config=config, ...); "
    "see 'Coming from PEFT' in docs/integrations.md"
)


def _not_peft(name: str) -> property:
    """An attribute that PEFT reads or sets on its configs: raises `NotPeftError` with lofit's advice."""

    def refuse(self: object, *value: object) -> Any:
        raise NotPeftError(f"{NOT_PEFT_CONFIG} (PEFT asked for LofitConfig.{name})")

    return property(
        refuse, refuse, doc=f"PEFT's `{name}`: not a LofitConfig attribute (raises NotPeftError)."
    )


class LofitConfigError(LofitValueError):
    """An adapter configuration is invalid; the message says which field to change."""


def normalize_heads(heads: Any) -> HeadMap | None:
    """Validate a `{layer: [head, ...]}` mapping and return it with int keys and sorted unique heads.

    JSON turns int keys into strings, so string keys such as `"3"` are accepted too.
    """
    if heads is None:
        return None
    if not isinstance(heads, dict):
        raise LofitConfigError(
            f"heads must be a dict mapping layer index -> list of head indices, got {type(heads).__name__}"
        )
    normalized: HeadMap = {}
    for raw_layer, raw_heads in heads.items():
        layer = _layer_index(raw_layer)
        if isinstance(raw_heads, int):
            raw_heads = [raw_heads]
        if not isinstance(raw_heads, (list, tuple, set)):
            raise LofitConfigError(f"heads[{layer}] must be a list of head indices, got {raw_heads!r}")
        indices = []
        for head in raw_heads:
            if isinstance(head, bool) or not isinstance(head, int):
                raise LofitConfigError(
                    f"heads[{layer}] holds {_short(head)}, which is not an integer head index"
                )
            if head < 0:
                raise LofitConfigError(f"heads[{layer}] holds negative head index {_short(head)}")
            if head > MAX_INDEX:
                raise LofitConfigError(
                    f"heads[{layer}] holds head index {_short(head)}; head indices are 0 <= h < the "
                    "model's number of heads"
                )
            indices.append(head)
        if indices:
            normalized[layer] = sorted(set(indices))
    return dict(sorted(normalized.items()))


def _short(value: Any) -> str:
    """`repr(value)`, shortened to 40 characters (an int of thousands of digits cannot even be printed)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**40:
        return f"{'-' if value < 0 else ''}<an integer of more than 40 digits>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _layer_index(raw_layer: Any) -> int:
    """A layer key as an int: an int, or the decimal digits JSON keys hold (no sign, space or "+")."""
    if isinstance(raw_layer, str):
        if not (raw_layer.isascii() and raw_layer.isdecimal()) or len(raw_layer) > 7:
            raise LofitConfigError(
                f'heads: layer key {_short(raw_layer)} is not a layer index; write it as digits only, e.g. "3"'
            )
        layer = int(raw_layer)
    elif isinstance(raw_layer, int) and not isinstance(raw_layer, bool):
        layer = raw_layer
    else:
        raise LofitConfigError(f"heads: layer key {_short(raw_layer)} is not an integer")
    if layer < 0:
        raise LofitConfigError(f"heads: layer index {_short(layer)} is negative")
    if layer > MAX_INDEX:
        raise LofitConfigError(
            f"heads: layer index {_short(layer)} is out of range; layers are numbered 0 <= l < num_layers"
        )
    return layer


@dataclass
class LofitConfig:
    """Configuration of one LoFiT adapter.

    Args:
        heads: layer -> head indices to adapt (JSON's string keys are accepted); None adapts every head.
        use_scale: learn A, applied as z <- (1 + A) * z (the head-selection step).
        use_offset: learn v, applied as z <- z + v (the offset-tuning step).
        init_std: standard deviation of the N(0, init_std) initialisation; 0.0 is an exact identity.
        target_modules: suffixes of the attention output projection's name; None auto-detects it
            (`lofit.adapters.architectures.OUTPUT_PROJECTION_SUFFIXES`).

    Example:
        >>> LofitConfig(heads={0: [1, 3]}, use_offset=True).num_selected_heads()
        2
        >>> LofitConfig.from_dict(LofitConfig(heads={"2": [0]}).to_dict()).heads
        {2: [0]}
    """

    heads: HeadMap | None = field(
        default=None,
        metadata={"help": "layer -> head indices to adapt; None adapts every head of every layer"},
    )
    use_scale: bool = field(default=False, metadata={"help": "learn A: z <- (1 + A) * z (head selection)"})
    use_offset: bool = field(default=True, metadata={"help": "learn v: z <- z + v (offset tuning)"})
    init_std: float = field(
        default=1e-3,
        metadata={"help": "standard deviation of the N(0, init_std) init; 0.0 is an exact identity"},
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "module-name suffixes of the attention output projection; None = auto-detect"},
    )

    def __post_init__(self) -> None:
        self.heads = normalize_heads(self.heads)
        for name in ("use_scale", "use_offset"):
            if not isinstance(getattr(self, name), bool):
                raise LofitConfigError(f"{name} must be true or false, got {_short(getattr(self, name))}")
        if not (self.use_scale or self.use_offset):
            raise LofitConfigError("at least one of use_scale and use_offset must be True")
        if (
            isinstance(self.init_std, bool)
            or not isinstance(self.init_std, (int, float))
            or not (0 <= self.init_std < math.inf)  # False for NaN; an int of any size compares fine
        ):
            raise LofitConfigError(f"init_std must be a finite number >= 0, got {_short(self.init_std)}")
        if self.init_std > 1e6:
            raise LofitConfigError(f"init_std {_short(self.init_std)} is far too large; use e.g. 1e-3")
        self.init_std = float(self.init_std)
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            if (
                not isinstance(self.target_modules, (list, tuple))
                or not self.target_modules
                or not all(isinstance(t, str) and t.strip() == t and t for t in self.target_modules)
            ):
                raise LofitConfigError("target_modules must be a non-empty list of module-name suffixes")
            self.target_modules = list(self.target_modules)

    # What peft.get_peft_model / PeftModel / inject_adapter_in_model read first: fail in lofit's words.
    peft_type = _not_peft("peft_type")
    base_model_name_or_path = _not_peft("base_model_name_or_path")
    task_type = _not_peft("task_type")
    is_prompt_learning = _not_peft("is_prompt_learning")

    def num_selected_heads(self) -> int | None:
        return None if self.heads is None else sum(len(h) for h in self.heads.values())

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.heads is not None:
            data["heads"] = {str(layer): heads for layer, heads in self.heads.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LofitConfig:
        if not isinstance(data, dict):
            raise LofitConfigError(f"a LofitConfig is a JSON object of fields, got {_short(data)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LofitConfigError(
                f"unknown LofitConfig fields {sorted(unknown)}; known fields: {sorted(known)}"
            )
        return cls(**data)
