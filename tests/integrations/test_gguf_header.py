"""A GGUF file whose header is damaged or lies about its size is refused before it is parsed, with a
`GGUFExportError` that names the file (never a `struct.error`, an `IndexError` or a long read)."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lofit import LofitConfig, get_lofit_model  # noqa: E402
from lofit.integrations.gguf import GGUFExportError, export_gguf  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


def _valid(path: Path) -> bytes:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(3)
    writer.add_head_count(4)
    writer.add_tensor("blk.0.attn_output.weight", np.zeros((32, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _header(version: int, tensors: int, entries: int) -> Callable[[bytes], bytes]:
    return lambda data: b"GGUF" + struct.pack("<IQQ", version, tensors, entries) + data[24:]


DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "2^60 tensors": (_header(3, 2**60, 0), "claims 1,152,921,504,606,846,976 tensors"),
    "2^64-1 tensors": (_header(3, 2**64 - 1, 3), "cannot fit"),
    "2^60 metadata entries": (_header(3, 1, 2**60), "metadata entries, which cannot fit"),
    "a million tensors in a small file": (_header(3, 10**6, 3), "cannot fit"),
    "version 1": (_header(1, 1, 3), "GGUF version 1 is not supported"),
    "version 2^32-1": (_header(2**32 - 1, 1, 3), "not supported"),
    "empty file": (lambda data: b"", "no GGUF header"),
    "magic only": (lambda data: b"GGUF", "no GGUF header"),
    "wrong magic": (lambda data: b"GGML" + data[4:], "no GGUF header"),
    "header cut inside the counts": (lambda data: data[:20], "no GGUF header"),
    "file cut after the header": (lambda data: data[:40], "cannot fit in its 40 bytes"),
    "file cut in the metadata": (lambda data: data[: len(data) // 8], "not a readable GGUF"),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_gguf_header_is_refused(tmp_path: Path, damage: str) -> None:
    edit, message = DAMAGE[damage]
    source = tmp_path / "base.gguf"
    source.write_bytes(edit(_valid(source)))
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads={0: [0]}))
    start = time.perf_counter()
    with pytest.raises(GGUFExportError, match=message) as error:
        export_gguf(model, source, tmp_path / "out.gguf")
    assert time.perf_counter() - start < 10
    assert str(source) in str(error.value)
    assert not (tmp_path / "out.gguf").exists()
