"""The `idp-serve` command: picks the subcommand, parses its settings, calls the module that does the work.

Every subcommand's flags, defaults and `--help` come from one pydantic-settings model (`server.lab.settings`, and
`server.online.settings.ServeSettings` for `serve`), with one precedence: flags > `IDP_*` environment > defaults.
The lab is imported only by lab commands, so a serving install needs none of the lab's packages.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError

from server.core.config import Settings
from server.online.settings import ServeSettings

if TYPE_CHECKING:
    from server.lab.evaluate.compare import Comparison
    from server.lab.settings import (
        AttentionSettings,
        CompressSettings,
        EvalInputs,
        EvaluatePoolSettings,
        EvaluateSettings,
        PrepareSettings,
        TrainSettings,
    )


def _command_line() -> str:
    """The command as typed, recorded in what it writes (model cards, bank manifests, reports)."""
    return "idp-serve " + shlex.join(sys.argv[1:])


def _prepare(settings: PrepareSettings) -> None:
    from server.core.identity import read_card
    from server.lab.compress import DEFAULT_SPEC, compress, verify_default
    from server.lab.convert import prepare_base
    from server.lab.evaluate.scoring import record_perplexity

    base = prepare_base(settings.models_dir, settings.home / "packages")
    print(f"base model: {base}")
    served = compress(base, DEFAULT_SPEC, settings.models_dir, settings.data_dir, "idp-serve prepare")
    for folder in (base, served):
        card = read_card(folder)
        if card is not None and "heldout_ppl" not in card.measured:
            record_perplexity(folder, settings.data_dir)
    print(f"compressed model (served on CPU): {served}")
    # A mismatch raises DefaultModelMismatch (a ModelError, so a ValueError): main() prints its plain message.
    print(f"default model weights {verify_default(served)} (the recorded ones the shipped banks were trained on)")


def _compress(settings: CompressSettings) -> None:
    from server.core.identity import resolve
    from server.lab.compress import compress
    from server.lab.evaluate.scoring import record_perplexity

    base = resolve(settings.model, settings.models_dir)
    served = compress(base, settings.spec(), settings.models_dir, settings.data_dir, _command_line())
    ppl = record_perplexity(served, settings.data_dir) if settings.measure else None
    print(f"{served}" + (f"  held-out perplexity {ppl:.2f}" if ppl is not None else ""))


def _train(settings: TrainSettings) -> None:
    import torch

    from server.core.identity import resolve
    from server.lab.loading import torch_device
    from server.lab.train import build_and_save

    device = torch_device(settings.device)
    student = resolve(settings.model, settings.models_dir)
    teacher = resolve(settings.teacher, settings.models_dir) if settings.objective == "kd" else None
    folder = build_and_save(
        student,
        teacher,
        settings.plan(),
        settings.spec(),
        settings.bank,
        settings.banks_dir,
        settings.data_dir,
        settings.home / "train",
        _command_line(),
        settings.single,
        device,
        getattr(torch, settings.model_dtype),
    )
    print(folder)


def _comparison(settings: EvalInputs) -> Comparison:
    """What `evaluate` and `attention` compare, resolved to folders; an unusable device is refused first."""
    from server.core.identity import resolve
    from server.lab.evaluate.compare import Comparison
    from server.lab.loading import torch_device

    device = torch_device(settings.device)
    return Comparison(
        base_dir=resolve(settings.base, settings.models_dir),
        compressed_dir=resolve(settings.model, settings.models_dir),
        bank_dir=settings.bank,
        single_dir=settings.single,
        tasks=settings.tasks,
        limit=settings.limit,
        data_dir=settings.data_dir,
        cache_dir=settings.home / "lora",
        lora_rank=settings.lora_rank,
        lora_lr=settings.lora_lr,
        device=device,
    )


def _evaluate(settings: EvaluateSettings) -> None:
    from server.lab.evaluate.compare import evaluate_all
    from server.lab.report import write_report

    result = evaluate_all(_comparison(settings), settings.bootstrap, settings.server_url, settings.server_limit)
    print(write_report(result, settings.out, _command_line()))


def _evaluate_pool(settings: EvaluatePoolSettings) -> None:
    import math

    from server.core.identity import resolve
    from server.lab.evaluate.pool import PoolInputs, evaluate_pool
    from server.lab.loading import torch_device

    inputs = PoolInputs(
        screening=settings.screening,
        base_dir=resolve(settings.base, settings.models_dir),
        compressed_dir=resolve(settings.model, settings.models_dir),
        bank_dir=settings.bank,
        single_dir=settings.single,
        lora_dirs=tuple(settings.lora),
        data_dir=settings.data_dir,
        out=settings.out,
        split=settings.split,
        cap=settings.cap,
        dev_cap=settings.dev_cap,
        general_tokens=settings.general_tokens,
        general_block=settings.general_block,
        device=torch_device(settings.device),
        command=_command_line(),
        bootstrap=settings.bootstrap,
    )
    out = evaluate_pool(
        inputs, settings.tasks, settings.max_seconds or math.inf, score=not settings.report_only, write=settings.write
    )
    if out is not None:
        print(out.with_suffix(".md").read_text() + f"\n{out}")


def _attention(settings: AttentionSettings) -> None:
    from server.lab.analysis import analyse
    from server.lab.report import write_attention

    print(write_attention(analyse(_comparison(settings)), settings.out, _command_line()))


def _serve(settings: ServeSettings, engine_flags: list[str]) -> None:
    """Serve with `settings`; vLLM engine flags given after `--` are parsed by vLLM itself and passed through."""
    if engine_flags:
        from server.online.engine import engine_options_from_cli

        settings.engine_options |= engine_options_from_cli(engine_flags)
    from server.online.app import run

    run(settings)


@dataclass(frozen=True)
class Command:
    """A subcommand: what runs it (given its parsed settings) and its line in `idp-serve --help`."""

    run: Callable[..., None]
    help: str


COMMANDS: dict[str, Command] = {
    "prepare": Command(_prepare, "convert the embedded default model, make its compressed variant"),
    "compress": Command(_compress, "compress a model with llm-compressor (GPTQ, SparseGPT, Wanda)"),
    "train": Command(_train, "train a prompt bank (or a single prompt) against a compressed model"),
    "evaluate": Command(_evaluate, "compare base, compressed, single prompt, IDP, forced prompts and LoRA"),
    "evaluate-pool": Command(
        _evaluate_pool, "the evaluation protocol on the screened pools: resumable, splittable, one report"
    ),
    "attention": Command(_attention, "per-layer attention deviation from the base model"),
    "serve": Command(_serve, "serve the OpenAI-compatible API (vLLM engine flags after `--`)"),
}


def settings_model(command: str) -> type[Settings]:
    """The settings model of a subcommand: the one source of its flags, environment variables and defaults."""
    if command == "serve":
        return ServeSettings
    from server.lab.settings import LAB_COMMANDS

    return LAB_COMMANDS[command]


def parse(command: str, argv: Sequence[str]) -> Settings:
    """The settings of `idp-serve <command> <argv>`: flags over `IDP_*` environment over the model's defaults."""
    model = settings_model(command)
    return model(
        _cli_parse_args=list(argv), _cli_kebab_case=True, _cli_prog_name=f"idp-serve {command}", _cli_show_env_vars=True
    )


def _choose_command(argv: list[str]) -> str:
    """The subcommand named first (argparse's usage, help and error for the top level)."""
    parser = argparse.ArgumentParser(
        prog="idp-serve",
        description="Serve compressed LLMs repaired per request by IDP, and the lab that makes them.",
        epilog="`idp-serve <command> --help` lists a command's flags, their IDP_* variables and defaults.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser.parse_args(argv[:1]).command


def _error(command: str, exc: Exception) -> str:
    """One line naming the command, and for refused settings each field, the problem and the value given."""
    if isinstance(exc, ValidationError):
        exc = "; ".join(_field_error(e) for e in exc.errors())
    return f"idp-serve {command}: error: {exc}"


def _field_error(error: dict) -> str:
    if not error["loc"]:  # a check across fields (e.g. gptq needs bits): the whole input is no help
        return error["msg"]
    return f"{'.'.join(map(str, error['loc']))}: {error['msg']} (got {error['input']!r})"


def split_engine_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """`serve`'s own flags, and the vLLM engine flags after `--`."""
    return (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _choose_command(argv)
    ours, engine_flags = split_engine_flags(argv[1:]) if command == "serve" else (argv[1:], [])
    try:
        settings = parse(command, ours)
        if command == "serve":
            return _serve(settings, engine_flags)
        import torch

        torch.set_num_threads(settings.torch_threads)
        COMMANDS[command].run(settings)
    except (ValueError, FileNotFoundError) as exc:  # ValidationError is a ValueError
        sys.exit(_error(command, exc))
    except ImportError as exc:  # a serving-only install (the serving images) has no lab packages
        sys.exit(
            _error(
                command,
                ImportError(
                    f"{exc}; `idp-serve {command}` needs the lab extra: "
                    "`IDP_EXTRAS=lab scripts/install.sh`, or the -lab image"
                ),
            )
        )


if __name__ == "__main__":
    main()
