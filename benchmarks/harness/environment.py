"""The machine and library versions a benchmark result was measured with (stored beside the result)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what `platform` knows).

    Example:
        >>> isinstance(cpu_name(), str)
        True
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """Machine, threads, load and versions (torch, transformers, peft when installed, lofit), plus the GPU.

    Example:
        >>> info = environment()
        >>> sorted(k for k in ("cpu", "lofit", "torch", "load_average_at_start") if k in info)
        ['cpu', 'load_average_at_start', 'lofit', 'torch']
    """
    import torch
    import transformers

    from lofit import __version__

    cpu = cpu_name()
    info: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {cpu}",
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lofit": __version__,
        "platform": platform.platform(),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a fresh `python -m benchmarks.X` child, plus `extra`.

    PYTHONPATH leads with the folders this process imported lofit and benchmarks from, so the child runs
    the same code wherever it was found (a checkout's src/, an installed copy).

    Example:
        >>> env = child_env(OMP_NUM_THREADS="1")
        >>> env["OMP_NUM_THREADS"], env["PYTHONPATH"].count(os.pathsep) >= 2
        ('1', True)
    """
    import benchmarks
    import lofit

    roots = [str(Path(str(m.__file__)).resolve().parents[1]) for m in (lofit, benchmarks)]
    path = os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, **extra, "PYTHONPATH": path}
