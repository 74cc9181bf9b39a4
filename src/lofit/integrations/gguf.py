"""Export a LoFiT adapter into a copy of its base model's GGUF file (llama.cpp / Ollama serving).

W_O (z + v) = W_O z + W_O v: an offset is a bias on the attention output projection. For every adapted
layer N the copy gains (or, if it has one, adds to) the F32 tensor `blk.N.attn_output.bias`, equal to
W_O[:, head slices] · v summed over the layer's adapted heads, with W_O the GGUF's own (dequantised)
`blk.N.attn_output.weight`. Everything else (metadata, tokenizer, every other tensor and its
quantisation) is copied byte for byte.

Scales, (W_O · diag(1 + A)), change the weight itself. They are folded only when that weight is stored
as F32, where the product is written exactly as the PyTorch merge computes it; for a quantised (Q4_1,
Q8_0, ...) or F16/BF16 weight a non-zero scale is refused: re-quantising would change the weights by
more than the scale does. llama.cpp's llama-family graphs apply `attn_output.bias` when present
(it is optional there, as for models trained with attention biases).

The file is written beside the output path and renamed into place only once complete; the input GGUF
is never written to.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapters.heads import module_tensor
from ..errors import LofitValueError
from ..io.atomic import atomic_path, output_target, write_guard

if TYPE_CHECKING:
    from ..adapters.model import LofitModel

EXACT_WEIGHT_TYPES = ("F32",)  # GGML types a scale can be folded into without rounding


class GGUFExportError(LofitValueError):
    """The adapter cannot be written into this GGUF file; the message says what to change."""


def export_gguf(
    model: LofitModel,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    adapter_name: str | None = None,
    progress: bool = False,
) -> Path:
    """Write a copy of the GGUF file `source` with `model`'s adapter folded in, to `out` (atomically).

    Args:
        model: a `LofitModel` on the base model that `source` holds (checked: the adapted layers'
            `attn_output.weight`, dequantised, must equal the model's output-projection weights).
        source: the base model's GGUF file; never modified.
        out: the output file (replaced atomically if it exists; must not be `source`).
        adapter_name: the adapter to export (default: the active one).
        progress: show a progress bar over the tensors written.

    Returns:
        The path written.

    Example:
        >>> from lofit.integrations.gguf import export_gguf  # doctest: +SKIP
        >>> export_gguf(lofit_model, "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-truthful.gguf")  # doctest: +SKIP
    """
    import gguf

    source, out = Path(source), Path(out)
    if not source.is_file():
        raise GGUFExportError(f"{source}: no such GGUF file; pass the base model's .gguf file")
    if out.exists() and out.resolve() == source.resolve():
        raise GGUFExportError(
            f"{out} is the input GGUF file; choose another output path (it is never overwritten)"
        )
    with write_guard({"source": source}, option="out"):
        output_target(out)  # a link or an input: refused before the (slow) edits
    check_gguf_header(source)
    try:
        reader = gguf.GGUFReader(str(source))
    except (ValueError, OSError, IndexError, KeyError, struct.error, OverflowError, MemoryError) as error:
        raise GGUFExportError(
            f"{source}: not a readable GGUF file ({type(error).__name__}: {error})"
        ) from None
    edits = gguf_edits(model, reader, adapter_name)
    with write_guard({"source": source}, option="out"), atomic_path(out) as tmp:
        write_gguf_copy(reader, edits, tmp, progress)
    return out


# The least bytes one tensor description and one metadata entry take in a GGUF header (name length,
# dimension count, one dimension, type and offset; key length, value type and a one-byte value).
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
MIN_KV_BYTES = 8 + 4 + 1


def check_gguf_header(path: Path) -> None:
    """Refuse a file whose GGUF header is not one, or claims more tensors or metadata than the file holds.

    Checked before the file is parsed, so that a header claiming 2^60 tensors is refused at once (a
    parser would try to read them, or fail with an internal error).

    Example:
        >>> import struct, tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".gguf") as file:
        ...     _ = file.write(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0)); file.flush()
        ...     try:
        ...         check_gguf_header(Path(file.name))
        ...     except GGUFExportError as error:
        ...         print(str(error).split(": ", 1)[1][:43])
        its header claims 1,152,921,504,606,846,976
    """
    with path.open("rb") as file:
        header = file.read(24)
    size = path.stat().st_size
    if len(header) < 24 or header[:4] != b"GGUF":
        raise GGUFExportError(
            f"{path}: not a readable GGUF file (no GGUF header); pass the base model's .gguf file"
        )
    version, tensors, entries = struct.unpack("<IQQ", header[4:])
    if version not in (2, 3):
        raise GGUFExportError(
            f"{path}: GGUF version {version} is not supported (2 or 3); convert the model again"
        )
    needed = 24 + tensors * MIN_TENSOR_INFO_BYTES + entries * MIN_KV_BYTES
    if needed > size:
        raise GGUFExportError(
            f"{path}: its header claims {tensors:,} tensors and {entries:,} metadata entries, which cannot fit "
            f"in its {size:,} bytes; the file is truncated or damaged. Download or convert it again"
        )


def gguf_edits(model: LofitModel, reader: Any, adapter_name: str | None = None) -> dict[str, np.ndarray]:
    """{tensor name: new F32 values} for every adapted layer: its attn_output bias (and weight, when a
    scale is folded)."""
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    _check_geometry(model, reader, tensors)
    edits: dict[str, np.ndarray] = {}
    for layer, vectors in model.adapter_vectors(adapter_name).items():
        weight_name = f"blk.{layer}.attn_output.weight"
        tensor = tensors[weight_name]
        matrix = _dequantized(tensor)  # [out, in], float32
        _check_same_weights(matrix, model.projections()[layer].base_layer, weight_name)
        scale = vectors.dense_scale()
        if scale is not None and bool((scale != 1).any()):
            if tensor.tensor_type.name not in EXACT_WEIGHT_TYPES:
                raise GGUFExportError(
                    f"{weight_name} is stored as {tensor.tensor_type.name}: the adapter's scale (A) would have "
                    "to be folded into these quantised weights, which cannot be done exactly. Export an "
                    "offsets-only adapter (use_scale=False, as LoFiT's step 2 trains), or merge into "
                    "safetensors with `lofit merge --out DIR`"
                )
            scaled = torch.from_numpy(matrix) * scale.detach().float().cpu()[None, :]
            edits[weight_name] = scaled.numpy()
        offset = vectors.dense_offset()
        if offset is not None:
            bias = _bias_of_offset(matrix, offset, tensors.get(f"blk.{layer}.attn_output.bias"))
            edits[f"blk.{layer}.attn_output.bias"] = bias
    for values in edits.values():
        if not np.isfinite(values).all():
            raise GGUFExportError("the folded values are not finite; the adapter's vectors contain NaN/inf")
    return edits


def _check_geometry(model: LofitModel, reader: Any, tensors: dict[str, Any]) -> None:
    geometry = model.geometry
    arch = _field(reader, "general.architecture")
    layers = _field(reader, f"{arch}.block_count")
    heads = _field(reader, f"{arch}.attention.head_count")
    if (layers, heads) != (geometry.num_layers, geometry.num_heads):
        raise GGUFExportError(
            f"the GGUF holds a {arch} model with {layers} layers x {heads} heads, but the adapter's base model "
            f"has {geometry.num_layers} x {geometry.num_heads}; pass the GGUF file of the model the adapter "
            "was trained on"
        )
    width = geometry.num_heads * geometry.head_dim
    for site in geometry.sites:
        name = f"blk.{site.layer}.attn_output.weight"
        if name not in tensors:
            raise GGUFExportError(
                f"the GGUF has no tensor {name}; lofit exports into llama.cpp-style files only"
            )
        if int(tensors[name].shape[0]) != width:  # GGUF shapes list the input (fastest) dimension first
            raise GGUFExportError(
                f"{name} has {int(tensors[name].shape[0])} input features, the adapter expects {width} "
                "(heads x head_dim); pass the GGUF file of the model the adapter was trained on"
            )


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        raise GGUFExportError(f"the GGUF file has no metadata key {key!r}; is it a llama.cpp model file?")
    return field.contents()


def _dequantized(tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.tensor_type)
    rows, columns = int(tensor.shape[1]), int(tensor.shape[0])
    return np.array(values, dtype=np.float32).reshape(rows, columns)  # a writable copy of the mapped file


def _check_same_weights(matrix: np.ndarray, projection: torch.nn.Module, name: str) -> None:
    """Refuse a GGUF whose weights are not the ones the adapter was trained with."""
    weight = module_tensor(projection, "weight")
    if not weight.dtype.is_floating_point:
        return  # a quantised PyTorch base: its weights cannot be compared exactly; the shapes were checked
    ours = weight.detach().float().cpu()
    ours = ours.t() if type(projection).__name__ == "Conv1D" else ours
    theirs = torch.from_numpy(matrix)
    tolerance = 4 * torch.finfo(weight.dtype).eps * float(theirs.abs().max()) + 1e-12
    if ours.shape != theirs.shape or float((ours - theirs).abs().max()) > tolerance:
        raise GGUFExportError(
            f"{name} differs from the adapter's base model weights; pass the GGUF file that the base model "
            "was loaded from (or load the base model from this GGUF)"
        )


def _bias_of_offset(matrix: np.ndarray, offset: torch.Tensor, existing: Any | None) -> np.ndarray:
    """W_O · v (+ the bias already in the file), in float32 as the PyTorch merge computes it."""
    bias = torch.from_numpy(matrix) @ offset.detach().float().cpu()
    if existing is not None:
        from gguf.quants import dequantize

        bias = bias + torch.from_numpy(np.array(dequantize(existing.data, existing.tensor_type), np.float32))
    return bias.numpy().astype(np.float32)


def write_gguf_copy(reader: Any, edits: dict[str, np.ndarray], path: Path, progress: bool = False) -> None:
    """Copy every metadata field and tensor of `reader` into `path`, with `edits` (F32 arrays) replacing
    tensors of the same name or, when new, inserted right after `blk.N.attn_output.weight`."""
    import gguf

    arch = _field(reader, "general.architecture")
    writer = gguf.GGUFWriter(str(path), arch=arch, endianess=reader.endianess)
    alignment = reader.get_field("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the writer writes these itself
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    planned = _tensor_plan(reader, edits)
    for name, data, raw_type in planned:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, data, _ in tqdm(planned, desc="writing GGUF", unit="tensor", disable=not progress, leave=False):
        writer.write_tensor_data(data, tensor_endianess=None if name in edits else reader.endianess)
    writer.close()


def _tensor_plan(reader: Any, edits: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray, Any]]:
    """(name, data, GGML type) in file order: originals (edited ones replaced), new biases after their weight."""
    import gguf

    f32 = gguf.GGMLQuantizationType.F32
    present = {tensor.name for tensor in reader.tensors}
    plan: list[tuple[str, np.ndarray, Any]] = []
    for tensor in reader.tensors:
        if tensor.name in edits:
            plan.append((tensor.name, edits[tensor.name].astype(np.float32), f32))
        else:
            plan.append((tensor.name, tensor.data, tensor.tensor_type))
        bias = tensor.name.removesuffix(".weight") + ".bias"
        if tensor.name.endswith("attn_output.weight") and bias in edits and bias not in present:
            plan.append((bias, edits[bias].astype(np.float32), f32))
    return plan


def gguf_file_of(model: str | os.PathLike[str]) -> Path:
    """The GGUF file behind `model`: the bundled name ("smollm2-135m") or a path to a .gguf file."""
    from ..io.loading import BUNDLED_MODELS, bundled_gguf_path

    source = str(model)
    path = Path(source).expanduser()
    if source.lower() in BUNDLED_MODELS and not path.exists():
        return bundled_gguf_path(source.lower())
    if path.is_file() and path.suffix == ".gguf":
        return path
    raise GGUFExportError(
        f"--gguf needs a GGUF base model, but {source!r} is not one; pass --model smollm2-135m (bundled as "
        "GGUF) or the path of a .gguf file (the adapter must have been trained on that model)"
    )


def merge_adapter_to_gguf(
    base: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    progress: bool = False,
) -> Path:
    """Load `base` (bundled name or .gguf file), attach the adapter saved in `adapter_dir`, and write a copy
    of the base's GGUF file with the adapter folded in to `out` (see `export_gguf`)."""
    from ..adapters.model import LofitModel
    from ..io.loading import load_model

    source = gguf_file_of(base)
    with write_guard({"base": source, "adapter_dir": adapter_dir}, option="out"):
        output_target(out)  # a link or an input: refused before the (slow) load
    with tqdm(total=2, desc="lofit merge --gguf", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("loading the base model and the adapter")
        lofit_model = LofitModel.from_pretrained(load_model(base)[0], adapter_dir)
        bar.update()
        bar.set_postfix_str(f"writing {out}")
        written = export_gguf(lofit_model, source, out, progress=progress)
        bar.update()
    return written
