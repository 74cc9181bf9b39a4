"""Interleaved timing of several methods, and peak memory (CUDA max allocated, or CPU peak RSS).

Methods are timed in rounds, A B C then C B A (so neither machine drift nor position in the round
favours one), after warm-up steps that are not timed; each round times `steps` consecutive steps of a
method on the same batches every method gets. Reported: the median tokens/s over all timed steps.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from _speed_methods import Bench, Method
from lofit.objectives import Example


@dataclass
class Timing:
    """Timed steps of one method: seconds and real (non-pad) tokens per step, and memory."""

    method: Method
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    padded_tokens: list[int] = field(default_factory=list)
    peak_bytes: int | None = None  # CUDA max allocated over the timed steps / peak RSS of a probe
    base_bytes: int | None = None  # allocated before the step (CUDA) / RSS after loading (CPU probe)
    memory_how: str = ""
    losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(t / s for t, s in zip(self.tokens, self.seconds, strict=True))

    @property
    def aggregate_tokens_per_s(self) -> float:
        return sum(self.tokens) / sum(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        """(lowest, highest) per-step tokens/s: how noisy the measurement was."""
        rates = [t / s for t, s in zip(self.tokens, self.seconds, strict=True)]
        return min(rates), max(rates)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - sum(self.tokens) / max(sum(self.padded_tokens), 1)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.spread
        return {
            "name": self.method.name,
            "label": self.method.label,
            "tokens_per_s": self.tokens_per_s,
            "aggregate_tokens_per_s": self.aggregate_tokens_per_s,
            "tokens_per_s_min": low,
            "tokens_per_s_max": high,
            "steps_timed": len(self.seconds),
            "step_s_median": statistics.median(self.seconds),
            "padding_fraction": self.padding_fraction,
            "peak_bytes": self.peak_bytes,
            "base_bytes": self.base_bytes,
            "memory_how": self.memory_how,
            "final_loss": self.losses[-1] if self.losses else None,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_tokens(examples: Sequence[Example]) -> tuple[int, int]:
    """(real tokens, padded tokens) of a batch as `collate` pads it."""
    lengths = [len(s.input_ids) for e in examples for s in e.sequences]
    return sum(lengths), len(lengths) * max(lengths)


def time_interleaved(
    bench: Bench,
    methods: Sequence[Method],
    rounds: int,
    steps: int,
    warmup: int,
    log: Callable[[str], None] = print,
) -> dict[str, Timing]:
    """Time every method's steps, interleaved; CUDA peak memory per method when on a GPU."""
    timings = {m.name: Timing(m) for m in methods}
    cuda = bench.device.type == "cuda"
    for method in methods:  # warm-up (kernel selection, allocator, optimizer state, compile)
        batches = bench.data[method.data]
        with bench.active(method) as params:
            step = bench.step_fn(method, params)
            started = time.perf_counter()
            for i in range(warmup):
                step(batches[i % len(batches)])
            synchronize(bench.device)
            log(f"  warm-up {method.name}: {time.perf_counter() - started:.1f} s")
    for round_index in range(rounds):
        order = list(methods) if round_index % 2 == 0 else list(reversed(methods))
        for method in order:
            timing = timings[method.name]
            batches = bench.data[method.data]
            with bench.active(method) as params:
                step = bench.step_fn(method, params)
                if cuda and round_index == 0:
                    synchronize(bench.device)
                    torch.cuda.reset_peak_memory_stats(bench.device)
                    timing.base_bytes = torch.cuda.memory_allocated(bench.device)
                for i in range(steps):
                    examples = batches[(round_index * steps + i) % len(batches)]
                    synchronize(bench.device)
                    started = time.perf_counter()
                    timing.losses.append(step(examples))
                    synchronize(bench.device)
                    timing.seconds.append(time.perf_counter() - started)
                    real, padded = batch_tokens(examples)
                    timing.tokens.append(real)
                    timing.padded_tokens.append(padded)
                if cuda and round_index == 0:
                    timing.peak_bytes = torch.cuda.max_memory_allocated(bench.device)
                    timing.memory_how = "CUDA max allocated over the first round's timed steps"
        log(
            f"  round {round_index + 1}/{rounds}: "
            + ", ".join(f"{m.name} {timings[m.name].tokens_per_s:.0f}" for m in methods)
        )
    return timings


# ------------------------------------------------------------------------------ CPU memory
def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def probe_memory_subprocess(argv: list[str], timeout: float = 600.0) -> dict[str, Any]:
    """Run `speed.py --memory-probe ...` in a fresh interpreter; return the JSON it prints last."""
    completed = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory probe {' '.join(argv)} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result
