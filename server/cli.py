"""The `idp-serve` command: parses arguments and calls the module that does the work, nothing more."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from server.core.config import Settings
from server.core.identity import DEFAULT_BASE, DEFAULT_MODEL

Handler = Callable[[argparse.Namespace, Settings], None]


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from IDP_* env, overridden by the flags given on the command line."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def _prepare(args: argparse.Namespace, settings: Settings) -> None:
    from server.lab.compress import DEFAULT_SPEC, compress
    from server.lab.evaluate import record_perplexity
    from server.core.identity import read_card
    from server.lab.convert import prepare_base

    base = prepare_base(settings.models_dir, settings.home / "packages")
    print(f"base model: {base}")
    served = compress(base, DEFAULT_SPEC, settings.models_dir, settings.data_dir, "idp-serve prepare")
    for folder in (base, served):
        card = read_card(folder)
        if card is not None and "heldout_ppl" not in card.measured:
            record_perplexity(folder, settings.data_dir)
    print(f"compressed model (served on CPU): {served}")


def _compress(args: argparse.Namespace, settings: Settings) -> None:
    from server.lab.compress import CompressionSpec, compress
    from server.lab.evaluate import record_perplexity
    from server.core.identity import resolve

    spec = CompressionSpec(
        method=args.method, bits=args.bits, group_size=args.group_size, sparsity=args.sparsity,
        structure=args.structure, calibration_samples=args.calibration_samples,
        calibration_len=args.calibration_len,
    )
    base = resolve(args.model, settings.models_dir)
    command = "idp-serve " + shlex.join(sys.argv[1:])
    served = compress(base, spec, settings.models_dir, settings.data_dir, command)
    ppl = record_perplexity(served, settings.data_dir) if args.measure else None
    print(f"{served}" + (f"  held-out perplexity {ppl:.2f}" if ppl is not None else ""))


def _train(args: argparse.Namespace, settings: Settings) -> None:
    from server.core.identity import resolve
    from server.lab.train import BankPlan, TrainSpec, build_and_save

    spec = TrainSpec(
        objective=args.objective, num_virtual_tokens=args.num_virtual_tokens, steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
    )
    plan = BankPlan(mode=args.mode, **({"sources": tuple(args.sources.split(","))} if args.sources else {}))
    student = resolve(args.model, settings.models_dir)
    teacher = resolve(args.teacher, settings.models_dir) if args.objective == "kd" else None
    command = "idp-serve " + shlex.join(sys.argv[1:])
    folder = build_and_save(
        student, teacher, plan, spec, args.bank, args.banks_dir, settings.data_dir,
        settings.home / "train", command, args.single,
    )
    print(folder)


def _eval_inputs(args: argparse.Namespace, settings: Settings) -> dict:
    """The arguments `evaluate_all` and `analyse` share, resolved to folders."""
    from server.core.identity import resolve

    return {
        "base_dir": resolve(args.base, settings.models_dir), "compressed_dir": resolve(args.model, settings.models_dir),
        "bank_dir": args.bank, "single_dir": args.single,
        "tasks": args.tasks.split(",") if args.tasks else None, "limit": args.limit, "data_dir": settings.data_dir,
        "cache_dir": settings.home / "lora", "lora_rank": args.lora_rank, "lora_lr": args.lora_lr,
    }


def _evaluate(args: argparse.Namespace, settings: Settings) -> None:
    from server.lab.evaluate import evaluate_all
    from server.lab.report import write_report

    result = evaluate_all(**_eval_inputs(args, settings), samples=args.bootstrap, server_url=args.server_url,
                          server_limit=args.server_limit)
    print(write_report(result, args.out, "idp-serve " + shlex.join(sys.argv[1:])))


def _attention(args: argparse.Namespace, settings: Settings) -> None:
    from server.lab.analysis import analyse
    from server.lab.report import write_attention

    rows = analyse(**_eval_inputs(args, settings))
    print(write_attention(rows, args.out, "idp-serve " + shlex.join(sys.argv[1:])))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help="root of idp-serve's caches (env IDP_HOME)")
    parser.add_argument("--models-dir", dest="models_dir", help="model folders (env IDP_MODELS_DIR)")
    parser.add_argument("--data-dir", dest="data_dir", help="offline corpora (env IDP_DATA_DIR)")
    parser.add_argument("--torch-threads", dest="torch_threads", type=int, help="torch threads (env IDP_TORCH_THREADS)")


def _eval_common(parser: argparse.ArgumentParser, tasks_help: str, limit: int) -> None:
    _common(parser)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the compressed model")
    parser.add_argument("--base", default=DEFAULT_BASE, help="the uncompressed model (and the LoRA's KD teacher)")
    parser.add_argument("--bank", type=Path, default=Path("prompt_banks/default"), help="the IDP bank folder")
    parser.add_argument("--single", type=Path, default=Path("prompt_banks/single"), help="the single-prompt bank")
    parser.add_argument("--tasks", help=f"comma-separated {tasks_help}")
    parser.add_argument("--limit", type=int, default=limit, help="test examples per task")
    parser.add_argument("--lora-rank", dest="lora_rank", type=int, default=1, help="LoRA rank on q/v (0: no LoRA)")
    parser.add_argument("--lora-lr", dest="lora_lr", type=float, default=1e-3,
                        help="LoRA learning rate (steps, batches and objective are the single prompt's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idp-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser("prepare", help="convert the embedded default model and make its default compressed variant")
    _common(prepare)
    prepare.set_defaults(handler=_prepare)

    comp = sub.add_parser("compress", help="compress a model with llm-compressor (GPTQ, SparseGPT, Wanda)")
    _common(comp)
    comp.add_argument("--model", default="smollm2-135m-instruct", help="model folder or name under the models dir")
    comp.add_argument("--method", required=True, choices=["gptq", "sparsegpt", "wanda"])
    comp.add_argument("--bits", type=int, help="gptq weight bits (2-8)")
    comp.add_argument("--group-size", dest="group_size", type=int, default=64)
    comp.add_argument("--sparsity", type=float, default=0.5)
    comp.add_argument("--structure", choices=["unstructured", "2:4"], default="unstructured")
    comp.add_argument("--calibration-samples", dest="calibration_samples", type=int, default=16)
    comp.add_argument("--calibration-len", dest="calibration_len", type=int, default=512)
    comp.add_argument("--no-measure", dest="measure", action="store_false", help="skip held-out perplexity")
    comp.set_defaults(handler=_compress)

    train = sub.add_parser("train", help="train a prompt bank (or a single prompt) against a compressed model")
    _common(train)
    train.add_argument("--mode", choices=["single", "curated", "joint"], default="curated")
    train.add_argument("--model", default=DEFAULT_MODEL, help="the compressed model the prompts repair")
    train.add_argument("--teacher", default="smollm2-135m-instruct", help="uncompressed model (objective kd)")
    train.add_argument("--objective", choices=["lm", "kd"], default="kd")
    train.add_argument("--bank", default="default", help="bank name (its folder under --banks-dir)")
    train.add_argument("--banks-dir", dest="banks_dir", type=Path, default=Path("prompt_banks"))
    train.add_argument("--sources", help="comma-separated data sources (default: news,howto,units,knowledge)")
    train.add_argument("--single", type=Path, help="a single-prompt bank to measure beside this one")
    train.add_argument("--num-virtual-tokens", "-m", dest="num_virtual_tokens", type=int, default=16)
    train.add_argument("--steps", type=int, default=40, help="steps per prompt")
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--batch-size", dest="batch_size", type=int, default=4)
    train.add_argument("--seq-len", dest="seq_len", type=int, default=64)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(handler=_train)

    evaluate = sub.add_parser("evaluate", help="compare base, compressed, single prompt, IDP, forced prompts and LoRA")
    _eval_common(evaluate, "tasks (MC names, *:gen generative ones; default all)", 40)
    evaluate.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% CIs")
    evaluate.add_argument("--server-url", dest="server_url", help="also re-score a sample through this live server")
    evaluate.add_argument("--server-limit", dest="server_limit", type=int, default=3,
                          help="examples per task re-scored through --server-url")
    evaluate.add_argument("--out", type=Path, default=Path("reports/evaluate"), help="report folder")
    evaluate.set_defaults(handler=_evaluate)

    attention = sub.add_parser("attention", help="per-layer attention deviation from the base model (analysis)")
    _eval_common(attention, "tasks whose test contexts are the inputs (default all MC tasks)", 5)
    attention.add_argument("--out", type=Path, default=Path("reports/attention"), help="report folder")
    attention.set_defaults(handler=_attention)
    sub.add_parser("serve", help="serve the OpenAI-compatible API (see `idp-serve serve --help`)")
    return parser


def serve(argv: list[str]) -> None:
    """`idp-serve serve [flags] [-- vLLM engine flags]`: flags and IDP_* env come from ServeSettings itself."""
    from server.online.settings import ServeSettings

    ours, engine_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    settings = ServeSettings(_cli_parse_args=ours, _cli_kebab_case=True, _cli_prog_name="idp-serve serve")
    if engine_flags:
        from server.online.engine import engine_options_from_cli

        settings.engine_options |= engine_options_from_cli(engine_flags)
    from server.online.app import run

    run(settings)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        try:
            return serve(argv[1:])
        except ValueError as exc:
            sys.exit(f"idp-serve serve: error: {exc}")
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    import torch

    torch.set_num_threads(settings.torch_threads)
    try:
        args.handler(args, settings)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
        sys.exit(f"idp-serve {args.command}: error: {errors}")
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"idp-serve {args.command}: error: {exc}")


if __name__ == "__main__":
    main()
