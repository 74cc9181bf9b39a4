"""Speed and memory of LoFiT training and inference against PEFT LoRA and full fine-tuning.

    # the bundled SmolLM2-135M on CPU (~10 min on 2 cores):
    python -m benchmarks.speed --target cpu
    # a Llama-2-7B-shaped random llama on one GPU (bf16, batch 8 x 512; < 5 min on an H100):
    python -m benchmarks.speed --target gpu

One run measures, on the same model, batches and batch shapes: the base forward; LoFiT step 1 (scales on
all heads); LoFiT step 2 (offsets on K = 10% of the heads: the heads `select_heads` picks for TruthfulQA,
heads spread over all layers, heads in the upper half); PEFT LoRA r8 on q,v; full fine-tuning (bundled
model only); then each optimisation on its own, inference (base vs adapter unmerged vs merged) and the
TruthfulQA MC evaluation (fast vs naive scorer). Results: benchmarks/results/speed_<target>.json and
speed.md (all targets measured so far).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .. import RESULTS
from ..harness.environment import environment
from . import targets
from .ablations import MEMORY_VARIANTS, Optimisation, ablation_sets
from .methods import Bench, Method, main_methods
from .timing import Timing, peak_rss_bytes, probe_memory_subprocess, rss_bytes, time_interleaved

STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", flush=True)


# ------------------------------------------------------------------------------------ options
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=sorted(targets.TARGETS), default="cpu")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (cpu 3, gpu 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per method")
    parser.add_argument("--ablation-rounds", type=int, default=None, help="rounds of each optimisation")
    parser.add_argument("--inference-repeats", type=int, default=None)
    parser.add_argument(
        "--heads-file", type=Path, default=None, help="heads.json/HeadSelection for 'selected'"
    )
    parser.add_argument("--select-records", type=int, default=32, help="TruthfulQA pairs for select_heads")
    parser.add_argument(
        "--eval-questions", type=int, default=20, help="TruthfulQA MC questions, fast vs naive"
    )
    parser.add_argument("--skip", default="", help="comma list of: selection,ablations,memory,inference,eval")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--data-dir", type=Path, default=None, help="benchmark data root (default: lofit's)")
    parser.add_argument("--layers", type=int, default=None, help="override the random model's layer count")
    parser.add_argument(
        "--model-shape", choices=["7b", "tiny"], default=None, help="random-model sizes (gpu: 7b, tiny: tiny)"
    )
    parser.add_argument(
        "--device", default=None, help="override the target's device (e.g. cpu for a dry run)"
    )
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="fp32 weights, no autocast (for CPUs without native bf16, where bf16 is emulated and slow)",
    )
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (cpu/tiny default 1: see the notes)"
    )
    parser.add_argument(
        "--memory-jobs",
        type=int,
        default=2,
        help="memory probes run this many at a time (peak RSS is per process)",
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite speed.md from the speed_*.json files in --out"
    )
    parser.add_argument("--memory-probe", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def set_threads(args: argparse.Namespace) -> None:
    """CPU targets default to 1 thread: on a shared 2-core machine, 2 OpenMP threads stall at every
    barrier whenever another process holds a core (measured 4-10x slower than 1 thread under load)."""
    device = args.device or targets.TARGETS[args.target].device
    if args.threads is None and device == "cpu":
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def resolve_target(args: argparse.Namespace) -> targets.Target:
    target = targets.TARGETS[args.target].with_overrides(
        batch_size=args.batch_size, seq_len=args.seq_len, device=args.device
    )
    if (args.layers is not None or args.model_shape is not None) and target.model != "random-llama":
        raise SystemExit("--layers and --model-shape apply only to random-model targets (gpu, tiny)")
    if args.model_shape is not None:
        shape = targets.LLAMA2_7B if args.model_shape == "7b" else targets.TINY_LLAMA
        target = dataclasses.replace(target, llama=dict(shape))
    if args.layers is not None:
        target = dataclasses.replace(target, llama={**target.llama, "num_hidden_layers": args.layers})
    if args.fp32:
        target = dataclasses.replace(target, weight_dtype=torch.float32, autocast=None)
    return target


DEFAULTS = {  # rounds, steps, warmup, ablation rounds, inference repeats
    "cpu": (5, 1, 1, 2, 6),
    "gpu": (4, 3, 2, 2, 6),
    "tiny": (2, 1, 1, 1, 2),
}


# ---------------------------------------------------------------------------------- the parts
def head_sets_for(
    args: argparse.Namespace, target: targets.Target, model: Any, tokenizer: Any, info: dict[str, Any]
) -> dict[str, dict[int, list[int]]]:
    from ..harness.internals import find_output_projections

    geometry = find_output_projections(model)
    k = targets.head_count(geometry.num_layers, geometry.num_heads, target.head_fraction)
    sets = targets.standard_head_sets(geometry.num_layers, geometry.num_heads, k)
    if args.heads_file is not None:
        sets = {"selected": targets.heads_from_file(args.heads_file, k), **sets}
        info["selected_heads_source"] = f"--heads-file {args.heads_file}"
    elif target.model == "smollm2-135m" and "selection" not in args.skip:
        path = args.out / "heads_truthfulqa_smollm2-135m.json"
        started = time.perf_counter()
        precision = "bf16" if target.autocast == torch.bfloat16 else "fp32"
        sets = {
            "selected": targets.select_truthfulqa_heads(
                model, tokenizer, k, args.select_records, path, precision, args.data_dir
            ),
            **sets,
        }
        info["selected_heads_source"] = (
            f"select_heads(method='lofit', objective='dpo', epochs=1, precision='{precision}') on the first "
            f"{args.select_records} TruthfulQA fold-0 training pairs; saved to {path.name}"
        )
        info["selection_seconds"] = time.perf_counter() - started
        log(f"selected heads in {info['selection_seconds']:.0f} s")
    else:
        info["selected_heads_source"] = (
            "none (random-weight model; pass --heads-file to add a 'selected' set)"
        )
    info["k"] = k
    info["total_heads"] = geometry.num_layers * geometry.num_heads
    info["head_sets"] = {name: {**targets.describe_heads(h), "heads": h} for name, h in sets.items()}
    return sets


def build_data(
    bench: Bench,
    target: targets.Target,
    tokenizer: Any,
    args: argparse.Namespace,
    n_batches: int,
    dpo: bool = True,
) -> dict[str, Any]:
    """The SFT batches; on the bundled model also TruthfulQA DPO batches, in random and length-grouped
    order (the first `n_batches` of each, reference log-probs cached). Returns facts for the report."""
    examples = targets.sft_examples(target, tokenizer, n_batches * target.batch_size, args.data_dir)
    bench.data["sft"] = targets.batches_of(examples, target.batch_size)
    if target.model != "smollm2-135m" or not dpo:
        return {}
    from lofit.tasks import load_task

    from ..harness.internals import epoch_batches

    task = load_task("truthfulqa", fold=0, data_dir=args.data_dir)
    pairs = bench.objectives["dpo"].encode(task.train)
    lengths = [len(s.input_ids) for e in pairs for s in e.sequences]
    size = target.batch_size
    facts: dict[str, Any] = {"dpo_pairs": len(pairs)}
    for name, grouped in (("dpo_random", False), ("dpo_grouped", True)):
        order = epoch_batches([e.num_tokens for e in pairs], size, torch.Generator().manual_seed(0), grouped)
        real = sum(lengths)
        padded = sum(2 * len(b) * max(lengths[2 * i + j] for i in b for j in (0, 1)) for b in order)
        facts[f"{name}_epoch_padding_fraction"] = 1 - real / padded
        bench.data[name] = [[pairs[i] for i in batch] for batch in order if len(batch) == size][:n_batches]
        bench.cache_references(name)
    return facts


def cpu_memory(
    args: argparse.Namespace, methods: list[Method], head_sets: dict[str, Any]
) -> dict[str, tuple[int, int, str]]:
    """name -> (peak RSS, RSS after setup, how) of each method, each in a fresh process."""
    from concurrent.futures import ThreadPoolExecutor

    memory = {}
    how = (
        "peak RSS (VmHWM) of a fresh process over 2 steps, its high-water mark reset after setup; glibc "
        "malloc with a fixed 64 KiB mmap threshold, so freed tensors leave RSS at once and the peak follows "
        "live tensor memory (repeat runs agree to the MiB)"
    )
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.memory_jobs) as pool:
        specs = []
        for method in methods:
            spec = Path(tmp) / f"{method.name}.json"
            spec.write_text(
                json.dumps(
                    {
                        "target": args.target,
                        "threads": args.threads,
                        "device": args.device,
                        "model_shape": args.model_shape,
                        "data_dir": None if args.data_dir is None else str(args.data_dir),
                        "layers": args.layers,
                        "seq_len": args.seq_len,
                        "batch_size": args.batch_size,
                        "head_sets": {
                            k: {str(layer): h for layer, h in v.items()} for k, v in head_sets.items()
                        },
                        "method": dataclasses.asdict(method),
                    }
                )
            )
            specs.append((method, spec))
        futures = [
            (
                method,
                pool.submit(probe_memory_subprocess, ["-m", "benchmarks.speed", "--memory-probe", str(spec)]),
            )
            for method, spec in specs
        ]
        for method, future in futures:
            result = future.result()
            memory[method.name] = (result["peak_rss"], result["rss_after_setup"], how)
            log(
                f"  memory {method.name}: peak {result['peak_rss'] / 2**20:.0f} MiB "
                f"(after setup {result['rss_after_setup'] / 2**20:.0f} MiB)"
            )
    return memory


def run_memory_probe(spec_path: Path) -> None:
    """Child process: set up like the parent, reset the RSS high-water mark, run 2 steps, print JSON."""
    spec = json.loads(spec_path.read_text())
    args = parse_args(["--target", spec["target"]])
    args.threads, args.device, args.model_shape = spec["threads"], spec["device"], spec["model_shape"]
    set_threads(args)
    args.data_dir = None if spec["data_dir"] is None else Path(spec["data_dir"])
    args.layers, args.seq_len, args.batch_size = spec["layers"], spec["seq_len"], spec["batch_size"]
    target = resolve_target(args)
    method = Method(**spec["method"])
    model, tokenizer = targets.build_model(target)
    head_sets = {k: {int(layer): h for layer, h in v.items()} for k, v in spec["head_sets"].items()}
    bench = Bench.build(model, tokenizer, head_sets, target.autocast, attention=target.train_attention)
    build_data(bench, target, tokenizer, args, n_batches=2, dpo=method.objective == "dpo")
    with bench.active(method) as params:
        step = bench.step_fn(method, params)
        batches = bench.data[method.data]
        setup_rss = rss_bytes()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM: the load's transient copies must not count
        for i in range(2):
            step(batches[i % len(batches)])
        peak = vm_hwm_bytes()
    print(json.dumps({"peak_rss": peak, "rss_after_setup": setup_rss, "ru_maxrss": peak_rss_bytes()}))


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def eval_speed(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """TruthfulQA MC on the first fold-0 test questions: scorer 'fast' vs 'naive' (fast, naive, fast)."""
    try:
        from lofit.evaluation import evaluate
    except ImportError as error:
        return {"skipped": f"lofit.evaluation is not available ({error})"}
    from lofit.tasks import load_task

    records = load_task("truthfulqa", fold=0, data_dir=args.data_dir).test[: args.eval_questions]
    timings: dict[str, list[float]] = {"fast": [], "naive": []}
    metrics: dict[str, Any] = {}
    for scorer in ("fast", "naive", "fast"):
        started = time.perf_counter()
        metrics[scorer] = evaluate(
            model, tokenizer, "truthfulqa_mc", records, scorer=scorer, progress=False, data_dir=args.data_dir
        )
        timings[scorer].append(time.perf_counter() - started)
        log(f"  eval {scorer}: {timings[scorer][-1]:.1f} s {metrics[scorer]}")
    fast, naive = min(timings["fast"]), min(timings["naive"])
    return {
        "questions": len(records),
        "seconds": timings,
        "speedup": naive / fast,
        "metrics": metrics,
        "max_metric_diff": max(abs(metrics["fast"][k] - metrics["naive"][k]) for k in metrics["fast"]),
    }


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args)
    if args.memory_probe is not None:
        run_memory_probe(args.memory_probe)
        return {}
    if args.render:
        from .report import render_results

        log(f"wrote {render_results(args.out)}")
        return {}
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    target = resolve_target(args)
    rounds, steps, warmup, ablation_rounds, repeats = DEFAULTS[target.name]
    rounds = args.rounds or rounds
    steps = args.steps or steps
    warmup = args.warmup if args.warmup is not None else warmup
    ablation_rounds = args.ablation_rounds or ablation_rounds
    repeats = args.inference_repeats or repeats
    if target.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--target gpu needs a CUDA device; use --target cpu or tiny here")
    command = "python -m benchmarks.speed " + shlex.join(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {
        "target": dataclasses.asdict(target)
        | {"weight_dtype": str(target.weight_dtype), "autocast": str(target.autocast)},
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": environment(),
        "settings": {"rounds": rounds, "steps": steps, "warmup": warmup, "ablation_rounds": ablation_rounds},
        "info": {},
    }
    log(
        f"target {target.name}: {target.model} on {target.device}, batch {target.batch_size} x {target.seq_len}"
    )
    model, tokenizer = targets.build_model(target)
    log("model ready")
    head_sets = head_sets_for(args, target, model, tokenizer, report["info"])
    bench = Bench.build(model, tokenizer, head_sets, target.autocast, attention=target.train_attention)
    report["info"].update(build_data(bench, target, tokenizer, args, n_batches=max(4, steps * 2)))
    report["info"]["scored_fraction"] = sum(
        s.num_targets for b in bench.data["sft"] for e in b for s in e.sequences
    ) / sum(e.num_tokens for b in bench.data["sft"] for e in b)
    report["info"]["tokens_per_batch"] = sum(e.num_tokens for e in bench.data["sft"][0])

    methods = main_methods(head_sets, target.full_finetune, lora_dropout_variant=True)
    log("main comparison: " + ", ".join(m.name for m in methods))
    clock = "cpu" if target.device == "cpu" else "wall"
    report["settings"]["clock"] = clock
    timings = time_interleaved(bench, methods, rounds, steps, warmup, log, clock)
    by_name = {m.name: m for m in methods}
    report["main"] = {name: t.to_dict() for name, t in timings.items()}
    save(report, args.out)  # after every phase: a run cut short (e.g. a device time limit) keeps its results

    ablations: dict[str, dict[str, Timing]] = {}
    views: list[Optimisation] = []
    sets: dict[str, list[Method]] = {}
    if "ablations" not in args.skip:
        sets, views = ablation_sets(
            by_name,
            target.train_attention,
            cpu_bf16=target.device == "cpu" and target.autocast == target.weight_dtype == torch.bfloat16,
            dpo="dpo_random" in bench.data,
            compile_=args.compile,
        )
        for set_name, members in sets.items():
            log(f"optimisations, set {set_name!r}: " + ", ".join(m.name for m in members))
            if set_name == "fp32":  # fp32 steps are ~8x slower on CPU: one untimed-warm-up-free pass
                set_rounds, set_steps, set_warmup = 1, 1, 0
            else:
                set_rounds, set_steps = ablation_rounds, 1
                set_warmup = max(warmup, 2) if set_name == "compile" else warmup
            try:
                ablations[set_name] = time_interleaved(
                    bench, members, set_rounds, set_steps, set_warmup, log, clock
                )
            except Exception as error:  # e.g. torch.compile without a working compiler: report, go on
                log(f"  set {set_name} failed: {type(error).__name__}: {error}")
                report["info"][f"{set_name}_error"] = f"{type(error).__name__}: {str(error)[:500]}"

    if target.device == "cpu" and "memory" not in args.skip:
        log("memory (one fresh process per configuration)")
        probed = [m for m in methods if m.name not in ("lora_again", "lora_dropout")]
        probed += [m for ms in sets.values() for m in ms if m.name in MEMORY_VARIANTS]
        memory = cpu_memory(args, probed, head_sets)
        for table in (timings, *ablations.values()):
            for name, timing in table.items():
                if name in memory:
                    timing.peak_bytes, timing.base_bytes, timing.memory_how = memory[name]

    report["main"] = {name: t.to_dict() for name, t in timings.items()}
    report["ablations"] = {g: {n: t.to_dict() for n, t in ts.items()} for g, ts in ablations.items()}
    report["optimisations"] = [dataclasses.asdict(v) for v in views if v.timed_in in ablations]
    save(report, args.out)

    if "eval" not in args.skip and target.model == "smollm2-135m":
        log("TruthfulQA MC evaluation speed")
        with bench.active(Method("eval", "evaluation", kind="forward", attention="sdpa")):
            report["eval"] = eval_speed(bench.lofit, tokenizer, args)
        save(report, args.out)

    if "inference" not in args.skip:
        from .inference import inference_models, measure_inference

        log("inference: base vs unmerged vs merged")
        adapter = "offsets_selected" if "selected" in head_sets else "offsets_spread"
        dtype = torch.bfloat16 if target.autocast == torch.bfloat16 else target.weight_dtype
        try:
            models = inference_models(bench, adapter, dtype)
            results, checks = measure_inference(
                models,
                bench.data["sft"][0],
                target.gen_batch,
                target.gen_prompt,
                target.gen_new,
                int(bench.objectives["sft"].pad_token_id),
                bench.device,
                repeats,
                log,
                clock,
            )
            report["inference"] = {
                "adapter": adapter,
                "dtype": str(dtype),
                "checks": checks,
                "workloads": [r.to_dict() for r in results],
            }
        except Exception as error:  # e.g. out of GPU memory for the model copies: keep the rest
            log(f"  inference failed: {type(error).__name__}: {error}")
            report["info"]["inference_error"] = f"{type(error).__name__}: {str(error)[:500]}"

    paths = save(report, args.out)
    log("wrote " + ", ".join(str(p) for p in paths))
    return report


def save(report: dict[str, Any], out: Path) -> list[Path]:
    from .report import write_results

    report["elapsed_s"] = time.perf_counter() - STARTED
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return write_results(report, out)


if __name__ == "__main__":
    main()
