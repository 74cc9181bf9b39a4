"""The `lofit` command: run, select, train, eval, merge and data.

Parsing imports no torch (the options live in the torch-free `lofit.cli.options`); each command imports the
heavy modules it needs when it runs. Errors: a `lofit.errors.LofitError` or an `OSError` is the user's to
fix and ends in one message with exit code 2; anything else is a bug in lofit and ends in "internal error"
with exit code 1. `--debug` adds the Python traceback to either.

Example:
    >>> from lofit.cli.main import main
    >>> main(["run", "--task", "sft", "--out", "runs/x", "--max-train", "-1"])
    2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import LofitError, LofitValueError
from ..io.locking import with_output_lock
from .options import PRECISIONS, QUANTIZATIONS, SELECT_METHODS, RunOptions, parse_k, suggest_option

TASK_HELP = (
    "truthfulqa, mquake, clutrr, svamp (their LoFiT splits), arc_easy, arc_challenge, boolq, siqa, openbookqa, "
    "piqa, winogrande, or sft, dpo, mc, exact_match with your own --train/--val/--test files"
)
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
MERGE_DTYPES = ("auto", "fp32", "bf16", "fp16")


class _Parser(argparse.ArgumentParser):
    """An argument parser without abbreviations: every option has one spelling, the same in every subcommand."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="smollm2-135m", help="Hugging Face id, local path, or smollm2-135m (bundled)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="compute precision of training and evaluation; auto = bf16 autocast where the hardware runs it "
        "fast (GPUs, CPUs with avx512_bf16/AMX), else fp32; the weights keep their dtype",
    )
    parser.add_argument(
        "--device-map", help="'auto' spreads a model too big for one GPU over all visible GPUs (one process)"
    )
    parser.add_argument(
        "--quantization", choices=QUANTIZATIONS, help="load the base through bitsandbytes (CUDA)"
    )


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help=TASK_HELP)
    parser.add_argument("--train", dest="train_file", help="training records (jsonl, json or csv)")
    parser.add_argument("--val", dest="val_file", help="validation records")
    parser.add_argument("--test", dest="test_file", help="test records")
    parser.add_argument(
        "--data-dir", help="where benchmark files live (default: $LOFIT_DATA_DIR or ../shared/data)"
    )
    parser.add_argument("--fold", type=int, default=0, help="TruthfulQA fold (0 or 1)")
    for split in ("train", "val", "test"):
        parser.add_argument(
            f"--max-{split}", type=int, metavar="N", help=f"use only the first N {split} records"
        )


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, help="training epochs (default: the task's, 5)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: the task's, 8)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    parser.add_argument("--max-length", type=int, help="truncate training sequences to N tokens")
    parser.add_argument("--beta", type=float, help="DPO beta (default: the task's, 0.5)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps (0 = off)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out, if there is one"
    )
    parser.add_argument(
        "--target-modules",
        nargs="+",
        metavar="SUFFIX",
        help="name suffix(es) of the attention output projections, if not found automatically "
        "(e.g. self_attn.o_proj)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute decoder-layer activations in backward: less memory, slower steps",
    )
    parser.add_argument(
        "--cache-lower-layers",
        choices=["auto", "on", "off"],
        default="auto",
        help="offset training runs the frozen layers below the lowest selected head once and keeps their "
        "output (exact, faster; auto = when it fits in 8 GiB)",
    )


def _add_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run", help="select heads, train offsets, evaluate base vs LoFiT, write a report"
    )
    _add_model_args(run)
    _add_data_args(run)
    _add_training_args(run)
    run.add_argument("--out", required=True, type=Path, help="output directory")
    run.add_argument(
        "--k", type=parse_k, help="heads to tune: an int, or a fraction of all heads (default: the task's)"
    )
    run.add_argument(
        "--select-method",
        choices=SELECT_METHODS,
        help="how heads are ranked (default: the task's: gradient-adam for truthfulqa, lofit = L1 otherwise)",
    )
    run.add_argument("--lr-select", type=float, help="learning rate of head selection (default: the task's)")
    run.add_argument("--lr-train", type=float, help="learning rate of offset training (default: the task's)")
    run.add_argument("--l1", type=float, help="L1 strength of head selection (default: the task's)")
    run.add_argument("--eval-batch-size", type=int, default=8, help="evaluation batch size (default 8)")
    run.add_argument(
        "--log-samples",
        action="store_true",
        help="also write DIR/samples-base.jsonl and DIR/samples-lofit.jsonl: one JSON line per test record "
        "(prompt, each choice's score or the generation, prediction, gold)",
    )
    run.set_defaults(handler=_cmd_run)


def _add_select(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    select = commands.add_parser("select", help="step 1: rank heads; writes heads.json and heads.png")
    _add_model_args(select)
    _add_data_args(select)
    _add_training_args(select)
    select.add_argument("--out", required=True, type=Path, help="output directory")
    select.add_argument(
        "--select-method",
        choices=SELECT_METHODS,
        help="how heads are ranked (default: the task's: gradient-adam for truthfulqa, lofit = L1 otherwise)",
    )
    select.add_argument(
        "--lr-select", type=float, help="learning rate of head selection (default: the task's)"
    )
    select.add_argument("--l1", type=float, help="L1 strength (default: the task's)")
    select.add_argument("--k", type=parse_k, help="heads marked on the heatmap (default: the task's)")
    select.set_defaults(handler=_cmd_select)


def _add_train(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = commands.add_parser("train", help="step 2: train offsets on the top-k heads of a selection")
    _add_model_args(train)
    _add_data_args(train)
    _add_training_args(train)
    train.add_argument("--heads", required=True, type=Path, help="heads.json written by `lofit select`")
    train.add_argument("--k", type=parse_k, help="heads to tune, int or fraction (default: the task's)")
    train.add_argument(
        "--lr-train", type=float, help="learning rate of offset training (default: the task's)"
    )
    train.add_argument("--out", required=True, type=Path, help="output directory (adapter and logs)")
    train.set_defaults(handler=_cmd_train)


def _add_eval(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    evaluate = commands.add_parser(
        "eval", help="evaluate a model (optionally with an adapter) on a task's split"
    )
    _add_model_args(evaluate)
    _add_data_args(evaluate)
    evaluate.add_argument("--adapter", type=Path, help="adapter directory (lofit_config.json + safetensors)")
    evaluate.add_argument("--eval-batch-size", type=int, default=8, help="evaluation batch size (default 8)")
    evaluate.add_argument("--split", default="test", choices=["val", "test"], help="the split to score")
    evaluate.add_argument("--out", type=Path, help="write the metrics as JSON to this file")
    evaluate.add_argument(
        "--log-samples",
        nargs="?",
        const=True,
        type=Path,
        metavar="FILE",
        help="also write one JSON line per record (prompt, each choice's score or the generation, prediction, "
        "gold) to FILE (default: beside --out, metrics.json -> metrics.samples.jsonl)",
    )
    evaluate.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    evaluate.set_defaults(handler=_cmd_eval)


def _add_merge(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    merge = commands.add_parser(
        "merge",
        help="fold an adapter into the base weights; plain transformers loads the result",
        description="Fold a LoFiT adapter into its base model's weights and write a checkpoint that "
        "transformers.AutoModelForCausalLM.from_pretrained loads without lofit.",
    )
    merge.add_argument(
        "--model",
        default="smollm2-135m",
        help="the base model the adapter was trained on (id, path or bundled)",
    )
    merge.add_argument("--adapter", required=True, type=Path, help="adapter directory written by lofit")
    merge.add_argument(
        "--out", type=Path, help="new directory for the merged checkpoint (never an input; or use --gguf)"
    )
    merge.add_argument(
        "--dtype",
        default="auto",
        choices=MERGE_DTYPES,
        help="dtype of the written weights; auto = the checkpoint's own (default)",
    )
    merge.add_argument(
        "--gguf",
        type=Path,
        help="also (or, without --out, only) write a copy of the base's GGUF file with the offsets as "
        "attn_output biases, for llama.cpp / Ollama (GGUF bases only: smollm2-135m or a .gguf file)",
    )
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model lofit did not write that --out already holds (else refused; a checkpoint "
        "lofit merged there before is replaced without it; files that are no model content are kept)",
    )
    merge.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    merge.set_defaults(handler=_cmd_merge)


def _add_data(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    data = commands.add_parser("data", help="benchmark data: where it is, or download it")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    where = data_commands.add_parser("path", help="print the data directory in use")
    where.add_argument("--data-dir", help="a data directory to check instead of the default")
    where.set_defaults(handler=_cmd_data_path)
    download = data_commands.add_parser("download", help="download benchmark files into the cache")
    download.add_argument("names", nargs="*", help="benchmarks (default: all)")
    download.add_argument("--cache-dir", help="cache directory (default: $LOFIT_CACHE_DIR or ~/.cache/lofit)")
    download.set_defaults(handler=_cmd_data_download)


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="vLLM's OpenAI-compatible server for a base model and many adapters (needs lofit[vllm])",
        description="Start vLLM's OpenAI-compatible server with the lofit plugin: a request's \"model\" "
        "is an adapter NAME or the base model's name. Every option lofit does not know goes to vLLM "
        "(--port, --dtype, --max-model-len, ...).",
        allow_abbrev=False,  # an abbreviated vLLM flag must reach vLLM, not match a lofit option
    )
    serve.add_argument("--model", required=True, help="the base model (a folder or a Hub id)")
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an adapter to serve as model NAME (a folder written by lofit or a Hub id); repeatable",
    )
    serve.set_defaults(handler=_cmd_serve, vllm_args=[])


def build_parser() -> argparse.ArgumentParser:
    """The `lofit` argument parser (no torch imported).

    Returns:
        An `argparse.ArgumentParser` whose parsed namespace carries the command's `handler`.

    Example:
        >>> args = build_parser().parse_args(["select", "--task", "mquake", "--out", "sel"])
        >>> args.command, args.k
        ('select', None)
    """
    parser: argparse.ArgumentParser = _Parser(
        prog="lofit", description="LoFiT: localized fine-tuning of attention heads."
    )
    parser.add_argument("--version", action="version", version=f"lofit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_select, _add_train, _add_eval, _add_merge, _add_serve, _add_data):
        add(commands)
    return parser


# ------------------------------------------------------------------------------------ commands
def run_options(args: argparse.Namespace) -> RunOptions:
    """`RunOptions` from a parsed `run`, `select`, `train` or `eval` command line (validated).

    Args:
        args: the namespace `build_parser().parse_args(...)` returned.

    Returns:
        The options; raises `LofitValueError` naming the option when a value cannot work.
    """
    command = args.command
    return RunOptions(
        task=args.task,
        out=args.out if args.out is not None else Path("."),
        model=args.model,
        train_file=args.train_file,
        val_file=args.val_file,
        test_file=args.test_file,
        data_dir=args.data_dir,
        fold=args.fold,
        k=getattr(args, "k", None),
        select_method=getattr(args, "select_method", None),
        epochs=getattr(args, "epochs", None),
        batch_size=getattr(args, "batch_size", None),
        lr_select=getattr(args, "lr_select", None),
        lr_train=getattr(args, "lr_train", None),
        l1=getattr(args, "l1", None),
        beta=getattr(args, "beta", None),
        seed=getattr(args, "seed", 42),
        max_train=args.max_train,
        max_val=args.max_val,
        max_test=args.max_test,
        max_length=getattr(args, "max_length", None),
        precision=args.precision,
        eval_batch_size=getattr(args, "eval_batch_size", 8),
        progress=args.progress,
        checkpoint_every=getattr(args, "checkpoint_every", 0),
        resume=getattr(args, "resume", False),
        gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
        cache_lower_layers=getattr(args, "cache_lower_layers", "auto"),
        target_modules=getattr(args, "target_modules", None),
        device_map=args.device_map,
        quantization=args.quantization,
        log_samples=getattr(args, "log_samples", None) is True and command == "run",
        command=command,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run

    options = run_options(args)
    start = time.perf_counter()
    metrics = run(options)
    print(json.dumps({"base": metrics["base"], "lofit": metrics["lofit"]}, indent=2))
    print(
        f"wrote {args.out}/report.md, metrics.json, heads.json, heads.png, adapter/ in {time.perf_counter() - start:.0f} s"
    )
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from .steps import select_step

    selection = select_step(run_options(args))
    print(f"top heads: {selection.ranking[:10]} ... written to {args.out}/heads.json and heads.png")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .steps import train_step

    model = train_step(run_options(args), args.heads)
    trainable = sum(p.numel() for p in model.adapter_parameters())
    print(f"trained {trainable:,} offset parameters; adapter written to {args.out}/adapter")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .steps import eval_step

    metrics = eval_step(run_options(args), args.adapter, args.split, args.out, args.log_samples)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .steps import merge_step

    if args.out is None and args.gguf is None:
        raise LofitValueError("lofit merge needs --out DIR (safetensors) and/or --gguf FILE (GGUF copy)")
    if args.gguf is not None:
        from ..integrations.gguf import merge_adapter_to_gguf

        written = merge_adapter_to_gguf(args.model, args.adapter, args.gguf, progress=args.progress)
        print(f"GGUF with the adapter folded in written to {written}; serve it with llama.cpp / Ollama")
    if args.out is not None:
        path = merge_step(args.model, args.adapter, args.out, args.dtype, args.overwrite, args.progress)
        print(
            f"merged checkpoint written to {path}; load it with transformers.AutoModelForCausalLM.from_pretrained"
        )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..integrations.vllm.serve import serve

    serve(args.model, args.adapter, args.vllm_args)  # replaces this process with vLLM's server
    return 0


def _cmd_data_path(args: argparse.Namespace) -> int:
    from ..tasks import resolve_data_dir

    print(resolve_data_dir(args.data_dir))
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from ..tasks import download_data

    written = download_data(args.names or None, cache_dir=args.cache_dir)
    print(f"downloaded to {written}")
    return 0


# ---------------------------------------------------------------------------------- entry point
def refuse_unknown(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """Exit 2 naming each unknown argument of `command` and the nearest valid option (`suggest_option`)."""
    subcommand = parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            subcommand = action.choices[command]
    valid = sorted(subcommand._option_string_actions)
    groups: list[list[str]] = []
    for argument in unknown:  # an unknown option and the values after it
        if argument.startswith("-") or not groups:
            groups.append([argument])
        else:
            groups[-1].append(argument)
    parts = []
    for group in groups:
        guess = suggest_option(group[0], valid) if group[0].startswith("--") else None
        parts.append(" ".join(group) + (f" (did you mean {guess}?)" if guess else ""))
    subcommand.error(f"unrecognized arguments: {'; '.join(parts)}")


def user_message(error: BaseException) -> str:
    """The one-paragraph text shown for a user-fixable error (an OSError without its "[Errno N]" prefix).

    Args:
        error: a `LofitError` or an `OSError`.

    Returns:
        The message.

    Example:
        >>> user_message(FileNotFoundError(2, "No such file or directory", "x.jsonl"))
        'x.jsonl: No such file or directory'
    """
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        text = str(error)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())  # one paragraph


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `lofit` command line.

    Args:
        argv: the arguments (default: `sys.argv[1:]`).

    Returns:
        The exit code: 0 on success, 2 for a user error (`LofitError`, `OSError`), 1 for an internal
        error, 130 when interrupted. Argument parsing errors exit 2 through `SystemExit`.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "serve":
        refuse_unknown(parser, args.command, unknown)
    if args.command == "serve":
        args.vllm_args = unknown  # vLLM's own flags pass through
    handler: Callable[[argparse.Namespace], int] = with_output_lock(args.handler)
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (LofitError, OSError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"lofit {args.command}: error: {user_message(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(
            f"lofit {args.command}: internal error ({type(error).__name__}): {error}\n"
            "This is a bug in lofit, not in your input; rerun with --debug for the traceback and please report it.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR
