"""The `tandem` command: generate, serve, eval, bench, cost.

Engine flags are generated from the config dataclasses (`--max-num-seqs`, `--block-size`, ...),
their help text from the fields' comments, so every argument has exactly one definition.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from tandem.config import engine_arg_fields, field_comments

_TYPES = {"int": int, "float": float, "str": str, "bool": bool,
          "SpeculativeConfig": str}  # JSON, parsed by the config
SHORT_FLAGS = {"tensor_parallel_size": "-tp"}  # vLLM's short spellings
HUMAN_INTS = ("max_model_len", "max_num_batched_tokens")  # "32k", "1K" as vLLM takes them


def human_int(text: str) -> int:
    """An integer, or vLLM's human-readable one: k, m, g powers of 1000, K, M, G of 1024
    ("32k" = 32000, "1K" = 1024)."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1] in scale:
        try:
            return int(float(text[:-1]) * scale[text[-1]])
        except ValueError:
            pass
    else:
        try:
            return int(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"invalid integer {text!r} (e.g. 4096, 32k, 1K)")


def add_config_args(group: Any, fields: list[dataclasses.Field], comments: dict[str, str],
                    defaults: dict[str, Any] | None = None,
                    choices: dict[str, tuple] | None = None) -> None:
    """One flag per dataclass field (`--max-num-seqs`), help from its comment. Every flag
    defaults to None ("not given") so the dataclass keeps its own default."""
    for f in fields:
        flags = ["--" + f.name.replace("_", "-")] + ([SHORT_FLAGS[f.name]]
                                                      if f.name in SHORT_FLAGS else [])
        base = str(f.type).replace(" | None", "").strip()
        default = (defaults or {}).get(f.name, f.default)
        shown = "" if default in (None, dataclasses.MISSING) else f" (default: {default})"
        text = (comments.get(f.name) or f.name.replace("_", " ")) + shown
        if base == "bool":
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        elif base == "tuple[str, ...]":  # one or more values (vLLM's nargs="+")
            group.add_argument(*flags, nargs="+", type=str, default=None, help=text)
        else:
            kind = human_int if f.name in HUMAN_INTS else _TYPES[base]
            group.add_argument(*flags, type=kind, default=None, help=text,
                               choices=(choices or {}).get(f.name))


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from tandem.config import ENGINE_CONFIGS

    comments: dict[str, str] = {}
    for cls in ENGINE_CONFIGS:  # the first definition wins
        comments = {**field_comments(cls), **comments}
    fields = [f for f in engine_arg_fields() if f.name not in ("model",) + skip]
    add_config_args(parser.add_argument_group("engine"), fields, comments)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine arguments the user set (unset flags keep the config defaults)."""
    names = {f.name for f in engine_arg_fields()} - {"model"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _cmd_generate(args: argparse.Namespace) -> int:
    from tandem.assets import default_model_dir
    from tandem.config import EngineConfig
    from tandem.engine.engine import Engine
    from tandem.engine.input_processor import resolve_max_tokens
    from tandem.request import SamplingParams

    engine = Engine(EngineConfig.from_kwargs(args.model or default_model_dir(),
                                             **engine_kwargs(args)))
    _, token_ids = engine.inputs.tokenize_prompt(args.prompt)
    max_tokens = resolve_max_tokens(len(token_ids), args.max_tokens, engine.max_model_len,
                                    tokens_param="--max-tokens")
    params = SamplingParams(max_tokens=max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    engine.add_request("cli", {"prompt": args.prompt, "prompt_token_ids": token_ids}, params)
    sent = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[sent:])
            sys.stdout.flush()
            sent = len(text)
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tandem import __version__

    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a completion of one prompt to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="model directory (default: embedded model)")
    gen.add_argument("--max-tokens", type=int, default=64,
                     help="tokens to generate (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    gen.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    add_engine_args(gen, skip=("seed",))
    gen.set_defaults(func=_cmd_generate)

    from tandem.bench.cli import add_bench_parser
    add_bench_parser(sub)
    from tandem.server.cli import add_serve_parser
    add_serve_parser(sub)
    from tandem.disagg.remote import add_worker_parser
    add_worker_parser(sub)
    from tandem.eval import add_eval_parser
    add_eval_parser(sub)
    from tandem.cost.cli import add_cost_parser
    add_cost_parser(sub)
    from tandem.quantization.cli import add_quant_parser
    add_quant_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as e:  # bad input: a clear message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
