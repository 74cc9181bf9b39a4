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

from lofit.training import Example

from ..harness.environment import child_env
from .methods import Bench, Method

CLOCKS = ("wall", "cpu")


@dataclass
class Timing:
    """Timed steps of one method: wall and process-CPU seconds, real (non-pad) tokens, round of each step.

    `clock` picks the primary measure: "wall" (GPU; any idle machine) or "cpu" (process CPU time: on a
    shared CPU machine it excludes the time other processes hold our core; single-threaded here).
    """

    method: Method
    clock: str = "wall"
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    padded_tokens: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    peak_bytes: int | None = None  # CUDA max allocated over the timed steps / peak RSS of a probe
    base_bytes: int | None = None  # allocated before the step (CUDA) / RSS after setup (CPU probe)
    memory_how: str = ""
    losses: list[float] = field(default_factory=list)

    def times(self, clock: str | None = None) -> list[float]:
        return self.cpu_seconds if (clock or self.clock) == "cpu" else self.seconds

    def rates(self, clock: str | None = None) -> list[float]:
        return [t / s for t, s in zip(self.tokens, self.times(clock), strict=True)]

    def tokens_per_s(self, clock: str | None = None) -> float:
        """Median over the timed steps of tokens / seconds."""
        return statistics.median(self.rates(clock))

    @property
    def padding_fraction(self) -> float:
        return 1.0 - sum(self.tokens) / max(sum(self.padded_tokens), 1)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "name": self.method.name,
            "label": self.method.label,
            "clock": self.clock,
            "steps_timed": len(self.seconds),
            "padding_fraction": self.padding_fraction,
            "peak_bytes": self.peak_bytes,
            "base_bytes": self.base_bytes,
            "memory_how": self.memory_how,
            "final_loss": self.losses[-1] if self.losses else None,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "tokens": self.tokens,
            "rounds": self.rounds,
        }
        for clock in CLOCKS:
            rates = self.rates(clock)
            suffix = "" if clock == self.clock else f"_{clock}"
            result[f"tokens_per_s{suffix}"] = statistics.median(rates)
            result[f"tokens_per_s_min{suffix}"] = min(rates)
            result[f"tokens_per_s_max{suffix}"] = max(rates)
        return result


def round_rates(row: dict[str, Any], clock: str) -> dict[int, float]:
    """Tokens per second of each round (its steps together) of a `Timing.to_dict()` row."""
    times = row["cpu_seconds"] if clock == "cpu" else row["seconds"]
    tokens: dict[int, float] = {}
    seconds: dict[int, float] = {}
    for r, t, s in zip(row["rounds"], row["tokens"], times, strict=True):
        tokens[r] = tokens.get(r, 0) + t
        seconds[r] = seconds.get(r, 0.0) + s
    return {r: tokens[r] / seconds[r] for r in tokens}


def paired_ratio(a: dict[str, Any], b: dict[str, Any], clock: str | None = None) -> float:
    """Median over shared rounds of a's / b's tokens/s within the round: drift cancels in the pairs."""
    clock = clock or a["clock"]
    rates_a, rates_b = round_rates(a, clock), round_rates(b, clock)
    shared = sorted(set(rates_a) & set(rates_b))
    return statistics.median(rates_a[r] / rates_b[r] for r in shared)


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
    clock: str = "wall",
) -> dict[str, Timing]:
    """Time every method's steps, interleaved; CUDA peak memory per method when on a GPU."""
    timings = {m.name: Timing(m, clock) for m in methods}
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
                    started, cpu_started = time.perf_counter(), time.process_time()
                    timing.losses.append(step(examples))
                    synchronize(bench.device)
                    timing.seconds.append(time.perf_counter() - started)
                    timing.cpu_seconds.append(time.process_time() - cpu_started)
                    timing.rounds.append(round_index)
                    real, padded = batch_tokens(examples)
                    timing.tokens.append(real)
                    timing.padded_tokens.append(padded)
                if cuda and round_index == 0:
                    timing.peak_bytes = torch.cuda.max_memory_allocated(bench.device)
                    timing.memory_how = "CUDA max allocated over the first round's timed steps"
        log(
            f"  round {round_index + 1}/{rounds}: "
            + ", ".join(f"{m.name} {timings[m.name].tokens_per_s():.0f}" for m in methods)
        )
    return timings


# ------------------------------------------------------------------------------ CPU memory
def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# glibc malloc with a fixed 64 KiB mmap threshold: every tensor buffer is its own mapping, returned to the
# OS when freed, so the RSS high-water mark follows the live tensor memory (deterministic to the MiB;
# with the default, adaptive threshold freed buffers linger in the heap and the peak varies by ~50 MiB).
PROBE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}


def probe_memory_subprocess(argv: list[str], timeout: float = 600.0) -> dict[str, Any]:
    """Run `python -m benchmarks.speed --memory-probe ...` in a fresh interpreter; return the JSON it prints last."""
    completed = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=child_env(**PROBE_MALLOC_ENV),
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory probe {' '.join(argv)} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result
