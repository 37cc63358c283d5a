"""`livetrain` command line: serve a model with the plugin, get the default model, build a
tiny one, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from livetrain.tools.default_model import (
    DEFAULT_MODEL_DIR,
    MODEL_NAME,
    ModelSetupError,
    fetch_model,
)
from livetrain.tools.launch import plugin_env, serve_command

# Only what a command needs is imported when it runs: torch and transformers alone take
# seconds, and `fetch-model` runs on every set-up.


def _serve(args: argparse.Namespace, vllm_args: list[str]) -> None:
    command = serve_command(args.model, vllm_args)
    os.execvpe(command[0], command, plugin_env(say=True))


def _build_model(args: argparse.Namespace, _: list[str]) -> None:
    from livetrain.tools.tiny_model import TINY_MODEL_DIR, build_tiny_model

    out = Path(args.out or TINY_MODEL_DIR)
    try:
        print(build_tiny_model(out, arch=args.arch, seed=args.seed, dtype=args.dtype))
    except ValueError as e:  # unknown arch or dtype, named by the builder
        sys.exit(str(e))


def _fetch_model(args: argparse.Namespace, _: list[str]) -> None:
    try:
        found = fetch_model(Path(args.out), force=args.force)
    except ModelSetupError as e:
        sys.exit(str(e))
    if found.state == "modified":
        print(f"warning: {found.detail}; kept as it is (--force converts afresh)", file=sys.stderr)
    print(args.out)


def _check(args: argparse.Namespace, _: list[str]) -> None:
    # vLLM logs to stdout at INFO by default; the report is what belongs there.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from livetrain.tools.check import as_json, check, render

    reports = check([Path(model) for model in args.models], dtype=args.dtype)
    if args.json:
        print("[" + ",\n".join(as_json(r) for r in reports) + "]")
    else:
        print("\n\n".join(render(r) for r in reports))
    sys.exit(0 if all(r.ok for r in reports) else 1)


def _demo(args: argparse.Namespace, _: list[str]) -> None:
    from livetrain.tools.demo import run_demo

    sys.exit(run_demo(port=args.port, max_steps=args.max_steps))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="livetrain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run vLLM's OpenAI server with livetrain enabled; other flags go to vLLM"
    )
    serve.add_argument("model")
    serve.set_defaults(run=_serve)

    check = commands.add_parser(
        "check",
        help="say, without a server, whether models can train in place, what trains and "
        "the memory it takes; exit status 1, with the reason, when one cannot",
    )
    check.add_argument("models", nargs="+", metavar="MODEL", help="folders of safetensors")
    check.add_argument("--dtype", default="auto", help="the dtype vLLM will serve (--dtype)")
    check.add_argument("--json", action="store_true", help="the report as JSON")
    check.set_defaults(run=_check)

    build = commands.add_parser("build-model", help="build a tiny random-weight model")
    build.add_argument("--out", default=None, help="default: ~/.cache/livetrain/models/tiny-llama")
    build.add_argument(
        "--arch", default="llama", help="model family, e.g. qwen3_moe (an unknown one lists all)"
    )
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    build.set_defaults(run=_build_model)

    fetch = commands.add_parser(
        "fetch-model",
        help=f"convert the built-in default model ({MODEL_NAME}) into a safetensors folder "
        "once, or check the one there",
    )
    fetch.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    fetch.add_argument("--force", action="store_true", help="convert again even if intact")
    fetch.set_defaults(run=_fetch_model)

    demo = commands.add_parser(
        "demo", help=f"serve {MODEL_NAME}, teach it a fact live, read its concepts"
    )
    demo.add_argument("--port", type=int, default=8765)
    demo.add_argument("--max-steps", type=int, default=8, help="most /train steps to teach")
    demo.set_defaults(run=_demo)

    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.run(args, rest)


if __name__ == "__main__":
    main()
