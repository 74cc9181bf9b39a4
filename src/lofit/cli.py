"""The `lofit` command: run, select, train, eval, merge and data."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ._version import __version__
from .pipeline import RunOptions, parse_k

TASK_HELP = "truthfulqa, mquake, clutrr (their LoFiT splits), or sft, dpo, mc, exact_match with --train/--val/--test files"
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="smollm2-135m", help="Hugging Face id, local path, or smollm2-135m (bundled)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="training precision; auto = bf16 autocast where the hardware runs it fast (GPUs, CPUs with "
        "avx512_bf16/AMX), else fp32. Evaluation always runs in the model's own dtype",
    )
    parser.add_argument(
        "--device-map", help="'auto' spreads a model too big for one GPU over all visible GPUs (one process)"
    )
    parser.add_argument(
        "--quantization", choices=["4bit", "8bit"], help="load the base through bitsandbytes (CUDA)"
    )


def _add_data_args(parser: argparse.ArgumentParser, required_task: bool = True) -> None:
    parser.add_argument("--task", required=required_task, help=TASK_HELP)
    parser.add_argument("--train", dest="train_file", help="training records (jsonl, json or csv)")
    parser.add_argument("--val", dest="val_file", help="validation records")
    parser.add_argument("--test", dest="test_file", help="test records")
    parser.add_argument(
        "--data-dir", help="where benchmark files live (default: $LOFIT_DATA_DIR or ../shared/data)"
    )
    parser.add_argument("--fold", type=int, default=0, choices=[0, 1], help="TruthfulQA fold")
    parser.add_argument("--max-train", type=int, help="use only the first N training records")
    parser.add_argument("--max-val", type=int, help="use only the first N validation records")
    parser.add_argument("--max-test", type=int, help="use only the first N test records")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, help="training epochs (default: the task's, 5)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default 8)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-length", type=int, help="truncate training sequences to N tokens")
    parser.add_argument("--beta", type=float, help="DPO beta (default 0.5)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofit", description="LoFiT: localized fine-tuning of attention heads."
    )
    parser.add_argument("--version", action="version", version=f"lofit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="select heads, train offsets, evaluate base vs LoFiT, write a report"
    )
    _add_model_args(run)
    _add_data_args(run)
    _add_training_args(run)
    run.add_argument("--out", required=True, type=Path, help="output directory")
    run.add_argument(
        "--k", type=parse_k, help="heads to tune: an int, or a fraction of all heads (default 0.1)"
    )
    run.add_argument("--select-method", default="lofit", choices=["lofit", "random", "probe", "gradient"])
    run.add_argument("--lr-select", type=float, help="learning rate of head selection")
    run.add_argument("--lr-train", type=float, help="learning rate of offset training")
    run.add_argument("--l1", type=float, help="L1 strength of head selection")
    run.add_argument("--eval-batch-size", type=int, default=8)
    run.set_defaults(handler=_cmd_run)

    select = commands.add_parser("select", help="step 1: rank heads; writes heads.json and heads.png")
    _add_model_args(select)
    _add_data_args(select)
    _add_training_args(select)
    select.add_argument("--out", required=True, type=Path)
    select.add_argument("--method", default="lofit", choices=["lofit", "random", "probe", "gradient"])
    select.add_argument("--lr", type=float, help="learning rate (default: the task's)")
    select.add_argument("--l1", type=float, help="L1 strength (default: the task's)")
    select.add_argument("--k", type=parse_k, default=0.1, help="heads marked on the heatmap")
    select.set_defaults(handler=_cmd_select)

    train = commands.add_parser("train", help="step 2: train offsets on the top-k heads of a selection")
    _add_model_args(train)
    _add_data_args(train)
    _add_training_args(train)
    train.add_argument("--heads", required=True, type=Path, help="heads.json written by `lofit select`")
    train.add_argument("--k", type=parse_k, default=0.1, help="heads to tune (int or fraction)")
    train.add_argument("--lr", type=float, help="learning rate (default: the task's)")
    train.add_argument("--out", required=True, type=Path, help="output directory (adapter and logs)")
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser(
        "eval", help="evaluate a model (optionally with an adapter) on a task's test split"
    )
    _add_model_args(evaluate)
    _add_data_args(evaluate)
    evaluate.add_argument("--adapter", type=Path, help="adapter directory (lofit_config.json + safetensors)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--split", default="test", choices=["val", "test"])
    evaluate.add_argument("--out", type=Path, help="write the metrics JSON here")
    evaluate.add_argument("--no-progress", dest="progress", action="store_false")
    evaluate.set_defaults(handler=_cmd_eval)

    merge = commands.add_parser(
        "merge", help="fold an adapter into the base weights; plain transformers loads it"
    )
    merge.add_argument("--model", default="smollm2-135m")
    merge.add_argument("--adapter", required=True, type=Path)
    merge.add_argument("--out", type=Path, help="output directory (safetensors checkpoint)")
    merge.add_argument(
        "--gguf",
        type=Path,
        help="also/instead write a copy of the base's GGUF file with the offsets as attn_output biases "
        "(GGUF base only: smollm2-135m or a .gguf file)",
    )
    merge.set_defaults(handler=_cmd_merge)

    data = commands.add_parser("data", help="benchmark data: where it is, or download it")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    where = data_commands.add_parser("path", help="print the data directory in use")
    where.add_argument("--data-dir")
    where.set_defaults(handler=_cmd_data_path)
    download = data_commands.add_parser("download", help="download benchmark files into the cache")
    download.add_argument("names", nargs="*", help="benchmarks (default: all)")
    download.add_argument("--cache-dir", help="cache directory (default: $LOFIT_CACHE_DIR or ~/.cache/lofit)")
    download.set_defaults(handler=_cmd_data_download)
    return parser


# ------------------------------------------------------------------------------------ commands
def _run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        task=args.task,
        out=args.out,
        model=args.model,
        train_file=args.train_file,
        val_file=args.val_file,
        test_file=args.test_file,
        data_dir=args.data_dir,
        fold=args.fold,
        k=getattr(args, "k", None),
        select_method=getattr(args, "select_method", getattr(args, "method", "lofit")),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr_select=getattr(args, "lr_select", None) or (args.lr if args.command == "select" else None),
        lr_train=getattr(args, "lr_train", None) or (args.lr if args.command == "train" else None),
        l1=getattr(args, "l1", None),
        beta=args.beta,
        seed=args.seed,
        max_train=args.max_train,
        max_val=args.max_val,
        max_test=args.max_test,
        max_length=args.max_length,
        precision=args.precision,
        eval_batch_size=getattr(args, "eval_batch_size", 8),
        progress=args.progress,
        checkpoint_every=getattr(args, "checkpoint_every", 0),
        resume=getattr(args, "resume", False),
        gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
        target_modules=getattr(args, "target_modules", None),
        device_map=getattr(args, "device_map", None),
        quantization=getattr(args, "quantization", None),
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run

    start = time.perf_counter()
    metrics = run(_run_options(args))
    print(json.dumps({"base": metrics["base"], "lofit": metrics["lofit"]}, indent=2))
    print(
        f"wrote {args.out}/report.md, metrics.json, heads.json, heads.png, adapter/ in {time.perf_counter() - start:.0f} s"
    )
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from .steps import select_step

    selection = select_step(_run_options(args))
    print(f"top heads: {selection.ranking[:10]} ... written to {args.out}/heads.json and heads.png")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .steps import train_step

    model = train_step(_run_options(args), args.heads)
    trainable = sum(p.numel() for p in model.adapter_parameters())
    print(f"trained {trainable:,} offset parameters; adapter written to {args.out}/adapter")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .steps import eval_step

    metrics = eval_step(_run_options_for_eval(args), args.adapter, args.split, args.batch_size, args.out)
    print(json.dumps(metrics, indent=2))
    return 0


def _run_options_for_eval(args: argparse.Namespace) -> RunOptions:
    for name in ("epochs", "lr", "seed", "max_length", "beta"):
        setattr(args, name, getattr(args, name, None))
    args.seed = args.seed if args.seed is not None else 42
    return _run_options(args)


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_adapter_checkpoint

    if args.out is None and args.gguf is None:
        raise ValueError("lofit merge needs --out DIR (safetensors) and/or --gguf FILE (GGUF copy)")
    if args.gguf is not None:
        from .gguf_export import merge_adapter_to_gguf

        written = merge_adapter_to_gguf(args.model, args.adapter, args.gguf)
        print(f"GGUF with the adapter folded in written to {written}; serve it with llama.cpp / Ollama")
    if args.out is not None:
        path = merge_adapter_checkpoint(args.model, str(args.adapter), str(args.out))
        print(
            f"merged checkpoint written to {path}; load it with transformers.AutoModelForCausalLM.from_pretrained"
        )
    return 0


def _cmd_data_path(args: argparse.Namespace) -> int:
    from .tasks import resolve_data_dir

    print(resolve_data_dir(args.data_dir))
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from .tasks import download_data

    written = download_data(args.names or None, cache_dir=args.cache_dir)
    print(f"downloaded to {written}")
    return 0


# ---------------------------------------------------------------------------------- entry point
def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors caused by input the user can fix: shown as one message, without a traceback."""
    from .loading import ModelLoadError
    from .trainer import NonFiniteLossError

    return (ValueError, KeyError, OSError, ImportError, ModelLoadError, NonFiniteLossError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    if args.debug:
        return handler(args)
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"lofit {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:  # an internal error: still no traceback unless --debug
        print(
            f"lofit {args.command}: internal error ({type(error).__name__}): {error}\n"
            "Rerun with --debug for the traceback and please report it.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR
