"""`livetrain` command line: serve a model with the plugin, build the tiny model, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from livetrain.launch import plugin_env, serve_command
from livetrain.tiny_model import ARCHS, DEFAULT_MODEL_DIR, build_tiny_model


def _serve(args: argparse.Namespace, vllm_args: list[str]) -> None:
    command = serve_command(args.model, vllm_args)
    os.execvpe(command[0], command, plugin_env())


def _build_model(args: argparse.Namespace, _: list[str]) -> None:
    print(build_tiny_model(Path(args.out), arch=args.arch, seed=args.seed, dtype=args.dtype))


def _demo(args: argparse.Namespace, _: list[str]) -> None:
    from livetrain.demo import run_demo

    run_demo(port=args.port, steps=args.steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="livetrain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run vLLM's OpenAI server with livetrain enabled; other flags go to vLLM"
    )
    serve.add_argument("model")
    serve.set_defaults(run=_serve)

    build = commands.add_parser("build-model", help="build a tiny random-weight model")
    build.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    build.add_argument("--arch", choices=ARCHS, default="llama")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    build.set_defaults(run=_build_model)

    demo = commands.add_parser("demo", help="serve the tiny model, train it live, show it learn")
    demo.add_argument("--port", type=int, default=8765)
    demo.add_argument("--steps", type=int, default=5)
    demo.set_defaults(run=_demo)

    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.run(args, rest)


if __name__ == "__main__":
    sys.exit(main())
