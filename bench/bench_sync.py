"""Checkpoint sync: blocks changed per step, sync against a full rewrite, diff speed.

    python3 bench/bench_sync.py

Every figure is printed next to a baseline measured in the same run:
- the fraction of file blocks (and of values) that `checkpoint_sync.plan` finds changed
  in the trained tensors (every 2-D linear weight but lm_head, dense APOLLO updates)
  after 1 and 5 steps at lr 1e-4 and 1e-5: an fp32 model against the fp32 files, a
  bf16 model against the same fp32 files and against bf16 files; the baseline is the
  same model after 0 steps;
- `checkpoint_sync.sync` time and bytes (blocks in place plus the redo journal that
  writes them a second time, or, where trained tensors hold most of a file's bytes,
  the file staged whole from the live tensors without comparing, and renamed) against a
  crash-safe full rewrite of the file with `safetensors.torch.save_file` + fsync +
  rename, with one decoder layer trained and with all of them; medians over fresh
  copies of the model, and the rounds' spread;
- the GB/s of `plan` reading and comparing every tensor when nothing changed, against
  `np.array_equal` over the same bytes already in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_argument, bench_model, random_samples  # noqa: E402

from livetrain.checkpoint.files import list_tensors  # noqa: E402
from livetrain.checkpoint.sync import (  # noqa: E402
    REPLACE_ABOVE,
    apply_journal,
    choose_replacements,
    fsync_path,
    plan,
    stage_file,
    sync,
    write_journal,
)
from livetrain.config import OptimizerSettings, PluginConfig, TrainableFamilies  # noqa: E402
from livetrain.tools.tiny_model import DTYPES  # noqa: E402
from livetrain.trainer.apollo import Apollo  # noqa: E402
from livetrain.trainer.model import classify  # noqa: E402

LRS = (1e-4, 1e-5)
STEPS = (1, 5)  # measured after this many steps, on one model
WEIGHTS = "model.safetensors"
Tensors = dict[str, torch.Tensor]


def fresh_copy(model_dir: Path, work: Path) -> Path:
    """A private copy of the model, already on disk: otherwise the fsync of the code
    being measured would also write out the copy's own dirty pages."""
    copy = Path(tempfile.mkdtemp(prefix="copy-", dir=work))
    shutil.copytree(model_dir, copy, dirs_exist_ok=True)
    fsync_path(copy / WEIGHTS)
    return copy


def bf16_copy(model_dir: Path, work: Path) -> Path:
    """The model with bfloat16 files (the other file dtype users serve)."""
    copy = fresh_copy(model_dir, work)
    weights = load_file(str(copy / WEIGHTS))
    save_file({k: v.bfloat16() for k, v in weights.items()}, str(copy / WEIGHTS))
    fsync_path(copy / WEIGHTS)
    return copy


def load_trainable(model_dir: Path, dtype: str) -> tuple[torch.nn.Module, Tensors]:
    """The model and what livetrain trains by default: 2-D linear weights, not lm_head."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    model.requires_grad_(False)
    attached = classify(model, TrainableFamilies())
    assert not attached.adamw_params, "the default config trains APOLLO weights only"
    return model, attached.apollo_params


def train(
    model: torch.nn.Module,
    optimizer: Apollo,
    params: Tensors,
    lr: float,
    steps: range,
    args: argparse.Namespace,
) -> None:
    """Dense APOLLO steps on random batches; `steps` numbers them so each gets new tokens."""
    vocab = model.config.vocab_size
    for step in steps:
        samples = random_samples(args.batch, args.tokens, args.tokens, vocab, seed=step)
        ids = torch.tensor([context + continuation for context, continuation in samples])
        # HF shifts the labels itself: this is next-token cross-entropy at every position.
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step(OptimizerSettings(lr=lr))
        for param in params.values():
            param.grad = None


def blocks_spanned(model_dir: Path, names: set[str], block: int) -> int:
    """File-aligned blocks the named tensors touch: plan's unit of comparison."""
    entries = [list_tensors(model_dir)[name] for name in names]
    return sum(-(-e.end // block) - e.begin // block for e in entries)


def changed(
    files_dir: Path, files: Tensors, live: Tensors, trained: set[str], block: int
) -> dict[str, float]:
    """What plan would write for the trained tensors, as fractions of blocks and values."""
    _, result = plan(list_tensors(files_dir), live.__getitem__, trained.__contains__, block)
    values = sum(int((live[n].to(files[n].dtype) != files[n]).sum()) for n in trained)
    return {
        "blocks_changed": result.blocks_changed,
        "of_trained_blocks": result.blocks_changed / blocks_spanned(files_dir, trained, block),
        "of_all_blocks": result.blocks_changed / result.blocks_total,
        "of_trained_values": values / sum(files[n].numel() for n in trained),
    }


def blocks_per_step(
    model_dir: Path, file_dirs: dict[str, Path], args: argparse.Namespace
) -> list[dict]:
    """One row per (model dtype, file dtype, lr, steps); lr None is the untrained model."""
    files = {dtype: load_file(d / WEIGHTS) for dtype, d in file_dirs.items()}
    pairs = {"float32": ("float32",), "bfloat16": ("float32", "bfloat16")}
    rows = []
    for model_dtype, file_dtypes in pairs.items():
        for lr, checkpoints in [(None, (0,))] + [(lr, STEPS) for lr in LRS]:
            model, params = load_trainable(model_dir, model_dtype)
            optimizer = Apollo(params, {})
            trained = set(params)
            done = 0
            for steps in checkpoints:
                if steps > done:  # the untrained baseline has no lr
                    train(model, optimizer, params, lr, range(done, steps), args)
                done = steps
                live = model.state_dict()
                for file_dtype in file_dtypes:
                    row = {"model": model_dtype, "files": file_dtype, "lr": lr, "steps": steps}
                    d = file_dirs[file_dtype]
                    rows.append(row | changed(d, files[file_dtype], live, trained, args.block))
    return rows


def full_rewrite(model_dir: Path, tensors: Tensors) -> float:
    """Seconds for what sync replaces, made as crash-safe as sync: save every tensor to
    a temporary file, fsync it, rename it over the original, fsync the directory."""
    path = model_dir / WEIGHTS
    tmp = path.with_suffix(".tmp")
    started = time.perf_counter()
    save_file(tensors, tmp, metadata={"format": "pt"})
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(model_dir)
    return time.perf_counter() - started


def phased_sync(model_dir: Path, live: Tensors, dirty: set[str], block: int) -> dict:
    """sync's steps run one by one: the bytes the journal and staging write (sync
    deletes both) and where the time goes; checks on the way that the files then
    match the live weights."""
    started = time.perf_counter()
    tensors = list_tensors(model_dir)
    replaced = choose_replacements(tensors, dirty.__contains__, REPLACE_ABOVE)
    staged_names = {n for n, e in tensors.items() if e.file.name in replaced}
    compared = dirty - staged_names
    writes, _ = plan(tensors, live.__getitem__, compared.__contains__, block)
    planned = time.perf_counter()
    staged_files = {
        name: stage_file(model_dir, name, tensors, live.__getitem__, dirty.__contains__)
        for name in replaced
    }
    staged = time.perf_counter()
    size = write_journal(model_dir, writes, staged_files).stat().st_size
    journaled = time.perf_counter()
    apply_journal(model_dir, writes, staged_files)
    applied = time.perf_counter()
    _, after = plan(list_tensors(model_dir), live.__getitem__, dirty.__contains__, block)
    assert after.blocks_changed == 0, "sync's writes must reproduce the live weights"
    return {
        "journal_bytes": size,
        "files_replaced": replaced,
        "plan_ms": (planned - started) * 1000,
        "stage_ms": (staged - planned) * 1000,
        "write_journal_ms": (journaled - staged) * 1000,
        "apply_journal_ms": (applied - journaled) * 1000,
    }


def sync_case(
    model_dir: Path, work: Path, live: Tensors, dirty: set[str], args: argparse.Namespace
) -> dict:
    """sync against a full rewrite on fresh copies, alternating so both share the noise."""
    sync_s, full_s = [], []
    for _ in range(args.repeats):
        copy = fresh_copy(model_dir, work)
        started = time.perf_counter()
        result = sync(copy, live.__getitem__, dirty.__contains__, args.block)
        sync_s.append(time.perf_counter() - started)
        shutil.rmtree(copy)
        copy = fresh_copy(model_dir, work)
        full_s.append(full_rewrite(copy, live))
        full_bytes = (copy / WEIGHTS).stat().st_size
        shutil.rmtree(copy)
    copy = fresh_copy(model_dir, work)
    phases = phased_sync(copy, live, dirty, args.block)
    journal = phases.pop("journal_bytes")
    shutil.rmtree(copy)
    ratios = [s / f for s, f in zip(sync_s, full_s, strict=True)]  # per alternating round
    return {
        "tensors_dirty": len(dirty),
        "blocks_changed": result.blocks_changed,
        "changed_block_bytes": result.blocks_changed * args.block,
        "files_replaced": result.files_replaced,
        "sync_ms": statistics.median(sync_s) * 1000,
        "full_rewrite_ms": statistics.median(full_s) * 1000,
        "sync_over_full_rewrite": statistics.median(sync_s) / statistics.median(full_s),
        "sync_over_full_rewrite_rounds": [round(r, 3) for r in ratios],
        "sync_bytes_staged_or_in_place": result.bytes_written,
        "sync_journal_bytes": journal,
        "full_rewrite_bytes": full_bytes,
        "sync_bytes_over_full_rewrite": (result.bytes_written + journal) / full_bytes,
        "sync_phases_one_run_ms": phases,
    }


def sync_vs_full_rewrite(
    model_dir: Path, bf16_dir: Path, work: Path, args: argparse.Namespace
) -> dict[str, dict]:
    """One decoder layer's linear weights changed and dirty, then all layers' (fp32
    model and files), then all layers of a bf16 model against bf16 files, where one
    small step leaves most values alone but changes nearly every block."""
    results = {}
    for files_dir, dtype in ((model_dir, "float32"), (bf16_dir, "bfloat16")):
        model, params = load_trainable(files_dir, dtype)
        train(model, Apollo(params, {}), params, LRS[0], range(1), args)
        original = load_file(files_dir / WEIGHTS)
        cases = {"all_layers": set(params)}
        if dtype == "float32":
            cases = {"one_layer": {n for n in params if n.startswith("model.layers.0.")}} | cases
        for case, dirty in cases.items():
            live = original | {n: params[n].detach() for n in dirty}
            name = case if dtype == "float32" else f"{case}_bf16"
            results[name] = sync_case(files_dir, work, live, dirty, args)
    return results


def median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def diff_throughput(model_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """plan over every tensor, nothing changed, against comparing the same bytes in memory.

    The file stays in the page cache throughout (it was just copied), so plan's reads
    are memory copies too: the ratio is the cost of its per-tensor mmap and copy, its
    cast (a no-op here, fp32 on both sides) and its per-block sums.
    """
    copy = fresh_copy(model_dir, work)
    live = load_file(copy / WEIGHTS)
    entries = list_tensors(copy)
    compared = sum(e.end - e.begin for e in entries.values())

    def plan_all() -> None:
        writes, _ = plan(entries, live.__getitem__, lambda _: True, args.block)
        assert not writes, "the live weights are the file's own"

    file_bytes = np.frombuffer((copy / WEIGHTS).read_bytes(), dtype=np.uint8)
    live_bytes = {n: t.reshape(-1).view(torch.uint8).numpy() for n, t in live.items()}

    def compare_in_memory() -> None:
        assert all(
            np.array_equal(file_bytes[e.begin : e.end], live_bytes[n]) for n, e in entries.items()
        )

    plan_all()  # warm-up: first-touch page faults and allocator growth are not the diff
    plan_s = median_s(plan_all, args.repeats)
    memory_s = median_s(compare_in_memory, args.repeats)
    shutil.rmtree(copy)
    return {
        "bytes_compared": compared,
        "plan_gb_s": compared / plan_s / 1e9,
        "in_memory_compare_gb_s": compared / memory_s / 1e9,
        "plan_time_over_in_memory": plan_s / memory_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="context and continuation each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=PluginConfig().sync_block_bytes)
    parser.add_argument(
        "--only-sync", action="store_true", help="skip the blocks-per-step and diff sections"
    )
    add_model_argument(parser)
    args = parser.parse_args()
    model_dir = bench_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="livetrain-bench-sync-"))
    try:
        file_dirs = {"float32": fresh_copy(model_dir, work), "bfloat16": bf16_copy(model_dir, work)}
        results: dict = {
            "model": str(model_dir),
            "block_bytes": args.block,
            "batch": args.batch,
            "tokens_per_sample": 2 * args.tokens,
        }
        if not args.only_sync:
            results["blocks_per_step"] = blocks_per_step(model_dir, file_dirs, args)
        results["sync_vs_full_rewrite"] = sync_vs_full_rewrite(
            model_dir, file_dirs["bfloat16"], work, args
        )
        if not args.only_sync:
            results["diff"] = diff_throughput(model_dir, work, args)
    finally:
        shutil.rmtree(work)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
