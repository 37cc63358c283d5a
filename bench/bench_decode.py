"""Decode speed with livetrain's live CPU weights against vLLM's default prepacking.

    python bench/bench_decode.py [--rounds 2] [--dtype float32]

On CPU vLLM prepacks linear weights for oneDNN/SGL kernels and frees the plain
ones; livetrain keeps the plain weights (so training reaches inference) and runs
F.linear on them. Servers alternate A/B/A/B so machine drift hits both sides.
Prints decode tokens/s for one stream and for a batch, and livetrain/default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_argument, bench_model, decode_tokens_per_s  # noqa: E402

from livetrain.tools.launch import Server, plugin_env  # noqa: E402

MODES = {"vllm_default": "", "livetrain": "livetrain"}  # VLLM_PLUGINS per mode


def measure(model: Path, mode: str, dtype: str, work: Path) -> dict[str, float]:
    env = plugin_env()
    env["VLLM_PLUGINS"] = MODES[mode]
    env["LIVETRAIN_STATE_DIR"] = str(work / "state")
    args = ["--enforce-eager", "--max-model-len", "512", "--dtype", dtype]
    with Server(model, 8312, args, env=env, log_path=work / f"{mode}.log") as server:
        server.wait_healthy()
        decode_tokens_per_s(server.url, 1, 16)  # warm-up
        return {
            "single_stream": statistics.median(
                decode_tokens_per_s(server.url, 1, 128) for _ in range(3)
            ),
            "batch_8": statistics.median(decode_tokens_per_s(server.url, 8, 128) for _ in range(3)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    add_model_argument(parser)
    args = parser.parse_args()
    model, work = bench_model(args.model), Path(tempfile.mkdtemp(prefix="livetrain-decode-"))
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            runs[mode].append(measure(model, mode, args.dtype, work))
    summary = {
        mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()
    }
    ratios = {k: summary["livetrain"][k] / summary["vllm_default"][k] for k in summary["livetrain"]}
    print(
        json.dumps(
            {
                "dtype": args.dtype,
                "tokens_per_s": summary,
                "livetrain_over_default": ratios,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
