"""Checkpoint sync: block diff, in-place write-back, crash safety under kill -9, and
trained weights that survive real vLLM restarts.

Expected bytes are computed independently of livetrain: headers are parsed here from the
raw files, and the bytes a live tensor should have on disk come from safetensors' own
serializer, so a shared bug in livetrain's parser or cast path cannot hide itself.

The fault-injection test runs `sync` in real child processes that SIGKILL themselves at
a chosen I/O call. Importing torch costs about a second per process, so this file doubles
as a fork server (`python test_checkpoint_sync.py JOBS.json`): it imports once and forks
one child per kill point.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import pathlib
import random
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from conftest import files_logprobs, start_server
from safetensors.torch import load_file, save, save_file

from livetrain.checkpoint.files import list_tensors
from livetrain.checkpoint.lock import FOLDER_LOCK, SERVER_LOCK, claim_for_server
from livetrain.checkpoint.sync import (
    JOURNAL,
    REPLACE_ABOVE,
    STAGE_PREFIX,
    STAGE_SUFFIX,
    BlockWrite,
    JournalCorrupt,
    StagedFileLost,
    SyncResult,
    UnsafeModelDir,
    apply_journal,
    choose_replacements,
    file_digest,
    plan,
    recover,
    settled,
    stage_file,
    sync,
    write_journal,
)
from livetrain.tools.client import LivetrainClient
from livetrain.tools.tiny_model import build_tiny_model

TMP_JOURNAL = f"{JOURNAL}.tmp"
FAULT_BLOCK = 256  # small blocks: many pwrite calls, so many kill points inside step 2
Change = Literal["dense", "one", "same", "clean"]


@dataclass(frozen=True)
class Spec:
    """One checkpoint tensor and what training did to it.

    change: "dense" (most elements differ), "one" (a single element differs), "same"
    (unchanged but reported dirty), "clean" (unchanged and not dirty: must not be read).
    """

    name: str
    dtype: torch.dtype  # dtype in the file
    shape: tuple[int, ...]
    change: Change
    live_dtype: torch.dtype  # dtype the trainer holds it in; sync casts to the file's
    shard: int


# Byte sizes are deliberately not multiples of 4096 (or of 256/512), so blocks straddle
# tensor boundaries; the float32 live copies of bf16/fp16 tensors exercise the cast.
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SPECS = [
    Spec("model.embed_tokens.weight", F32, (37, 29), "dense", F32, 0),
    Spec("model.layers.0.self_attn.q_proj.weight", BF16, (61, 45), "one", BF16, 0),
    Spec("model.layers.0.input_layernorm.weight", F16, (777,), "clean", F16, 0),
    Spec("model.layers.0.mlp.up_proj.weight", F32, (50, 33), "same", F32, 0),
    Spec("model.layers.0.scale", F32, (), "dense", F32, 0),
    Spec("model.layers.1.self_attn.q_proj.weight", BF16, (3001,), "dense", F32, 1),
    Spec("model.layers.1.mlp.down_proj.weight", F16, (41, 67), "one", F16, 1),
    Spec("model.layers.1.post_attention_layernorm.weight", BF16, (517,), "same", F32, 1),
    Spec("model.layers.1.empty", F32, (0, 4), "dense", F32, 1),
    Spec("model.norm.weight", F16, (123,), "clean", F16, 1),
    Spec("lm_head.weight", F32, (2, 3), "one", F32, 1),
]
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


@dataclass
class Model:
    dir: Path
    files: list[str]
    old: dict[str, torch.Tensor]  # what the files hold, in the file dtype
    new: dict[str, torch.Tensor]  # live tensors, in the live dtype
    dirty: set[str]

    def live(self, name: str) -> torch.Tensor:
        assert name in self.dirty, f"{name} is not dirty and must not be read"
        return self.new[name]


def build_model(model_dir: Path, sharded: bool) -> Model:
    """A model directory holding the old weights, and the live (new) weights beside it."""
    gen = torch.Generator().manual_seed(1234)
    old: dict[str, torch.Tensor] = {}
    new: dict[str, torch.Tensor] = {}
    for spec in SPECS:
        base = torch.randn(spec.shape, generator=gen).to(spec.dtype)
        live = base.to(spec.live_dtype, copy=True)  # never an alias of the old value
        if spec.change == "dense":
            live = live + torch.randn(spec.shape, generator=gen).to(spec.live_dtype)
        elif spec.change == "one":
            i = int(torch.randint(base.numel(), (1,), generator=gen))
            live.view(-1)[i] += 1.0
        old[spec.name], new[spec.name] = base, live
    model_dir.mkdir(parents=True)
    if sharded:
        files = SHARDS
        for shard, file in enumerate(files):
            part = {s.name: old[s.name] for s in SPECS if s.shard == shard}
            save_file(part, model_dir / file, metadata={"format": "pt"})
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in old.values())},
            "weight_map": {s.name: files[s.shard] for s in SPECS},
        }
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        files = ["model.safetensors"]
        save_file(old, model_dir / files[0], metadata={"format": "pt"})
    dirty = {s.name for s in SPECS if s.change != "clean"}
    return Model(model_dir, files, old, new, dirty)


@pytest.fixture(params=[False, True], ids=["single", "sharded"])
def model(request: pytest.FixtureRequest, tmp_path: Path) -> Model:
    return build_model(tmp_path / "model", sharded=request.param)


def as_file_bytes(tensor: torch.Tensor, dtype: torch.dtype) -> bytes:
    """The data bytes safetensors itself writes for `tensor` stored as `dtype`."""
    raw = save({"t": tensor.to(dtype).contiguous()})
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8 + length :]


def layout(raw: bytes) -> tuple[int, dict[str, tuple[torch.dtype, int, int]]]:
    """Header end and each tensor's (dtype, begin, end) absolute byte range, parsed here."""
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    codes = {"F32": F32, "BF16": BF16, "F16": F16}
    data = 8 + length
    tensors = {
        name: (codes[info["dtype"]], data + info["data_offsets"][0], data + info["data_offsets"][1])
        for name, info in header.items()
    }
    return data, tensors


def snapshot(model: Model, model_dir: Path | None = None) -> dict[str, bytes]:
    """The raw bytes of the model's weight files (in `model_dir` if given)."""
    return {f: ((model_dir or model.dir) / f).read_bytes() for f in model.files}


def expected_new_files(model: Model, old_files: dict[str, bytes]) -> dict[str, bytes]:
    """The old files with every dirty tensor's data replaced by its live value."""
    result = {}
    for file, raw in old_files.items():
        buf = bytearray(raw)
        for name, (dtype, begin, end) in layout(raw)[1].items():
            if name in model.dirty:
                buf[begin:end] = as_file_bytes(model.new[name], dtype)
        result[file] = bytes(buf)
    return result


def assert_holds(model: Model, which: Literal["old", "new"], context: object = "") -> None:
    """The directory loads, and every tensor is bitwise the old or the new value."""
    want = model.old if which == "old" else model.new
    for file in model.files:
        for name, tensor in load_file(model.dir / file).items():
            expected = want[name] if name in model.dirty else model.old[name]
            assert tensor.dtype == model.old[name].dtype and tensor.shape == expected.shape
            assert as_file_bytes(tensor, tensor.dtype) == as_file_bytes(expected, tensor.dtype), (
                f"{file}:{name} is not the {which} value {context}"
            )


def no_journal(model_dir: Path) -> bool:
    journals = (model_dir / JOURNAL).exists() or (model_dir / TMP_JOURNAL).exists()
    return not journals and not list(model_dir.glob(f"{STAGE_PREFIX}*"))


# 1. The block diff ------------------------------------------------------------------------


@pytest.mark.parametrize("block", [4096, 512])
def test_plan_writes_exactly_the_differing_file_aligned_blocks(model: Model, block: int) -> None:
    old_files = snapshot(model)
    new_files = expected_new_files(model, old_files)
    expected: list[tuple[str, int, bytes]] = []
    windows = changed_windows = 0
    for file, raw in old_files.items():
        for begin, end in (span[1:] for span in layout(raw)[1].values()):
            # Every file-aligned window [k*B, (k+1)*B) the tensor overlaps, clipped to it
            # (an empty tensor overlaps none); adjacent differing windows of one tensor
            # are expected as one merged write.
            run_end = None
            for k in range(begin // block, -(-end // block) if end > begin else 0):
                lo, hi = max(begin, k * block), min(end, (k + 1) * block)
                windows += 1
                if raw[lo:hi] == new_files[file][lo:hi]:
                    continue
                changed_windows += 1
                if run_end == lo:
                    f, start, data = expected.pop()
                    expected.append((f, start, data + new_files[file][lo:hi]))
                else:
                    expected.append((file, lo, new_files[file][lo:hi]))
                run_end = hi
    assert 0 < changed_windows < windows  # the diff is neither empty nor everything

    read: list[str] = []

    def live(name: str) -> torch.Tensor:
        read.append(name)
        return model.live(name)  # raises for a tensor that is not dirty

    writes, result = plan(list_tensors(model.dir), live, model.dirty.__contains__, block)

    assert sorted((w.file, w.offset, w.data) for w in writes) == sorted(expected)
    assert result.blocks_total == windows
    assert result.blocks_changed == changed_windows
    assert result.bytes_written == sum(len(data) for _, _, data in expected)
    assert result.files == sorted({file for file, _, _ in expected})
    assert set(read) <= model.dirty and len(read) == len(set(read))
    assert snapshot(model) == old_files  # planning never writes


# 2. A complete sync ---------------------------------------------------------------------


@pytest.mark.parametrize("replace_above", [math.inf, 0.0], ids=["blocks", "replace"])
def test_sync_writes_the_new_weights_in_place(model: Model, replace_above: float) -> None:
    """Changed blocks patched in place, or (every file over the threshold) each file
    staged whole from the live tensors, without comparing, and renamed over the old one:
    the same bytes either way."""
    old_files = snapshot(model)
    new_files = expected_new_files(model, old_files)
    modes = {f: (model.dir / f).stat().st_mode for f in model.files}

    first = sync(model.dir, model.live, model.dirty.__contains__, 512, replace_above)

    assert first.files == sorted(model.files)
    tensors = list_tensors(model.dir).items()
    never_read = {n for n, e in tensors if n not in model.dirty or e.end == e.begin}
    assert first.tensors_skipped == len(never_read)  # untouched, or nothing to write
    if replace_above:
        assert first.blocks_changed > 0 and first.files_replaced == []
    else:  # nothing compared: every file written once, whole
        assert first.blocks_changed == 0 and first.files_replaced == first.files
        assert first.bytes_written == sum(len(raw) for raw in old_files.values())
    assert {f: (model.dir / f).stat().st_mode for f in model.files} == modes
    assert_holds(model, "new")
    after = snapshot(model)
    for file, raw in after.items():
        header_end = layout(old_files[file])[0]
        assert raw[:header_end] == old_files[file][:header_end]  # names, shapes, offsets
        assert len(raw) == len(old_files[file])
        assert raw == new_files[file]  # nothing outside the tensors' data moved either
    assert no_journal(model.dir)

    # Compared again (never replaced), nothing differs any more.
    second = sync(model.dir, model.live, model.dirty.__contains__, 512, math.inf)
    assert (second.blocks_changed, second.bytes_written, second.files) == (0, 0, [])
    assert snapshot(model) == after and no_journal(model.dir)


# 3. Crash safety under kill -9 -------------------------------------------------------------


@pytest.mark.parametrize("replace_above", [math.inf, 0.0], ids=["blocks", "replace"])
def test_kill_at_any_io_call_then_recover_gives_all_old_or_all_new(
    model: Model, tmp_path: Path, replace_above: float
) -> None:
    template = model.dir
    old_files = snapshot(model)
    new_path = tmp_path / "new.safetensors"
    save_file({n: t.contiguous() for n, t in model.new.items() if n in model.dirty}, new_path)

    def run_children(jobs: list[dict[str, Any]]) -> list[int]:
        """Each job: a fresh copy of the old directory, synced in a forked child."""
        for job in jobs:
            shutil.copytree(template, job["dir"])
        spec = {"new": str(new_path), "block_size": FAULT_BLOCK, "jobs": jobs}
        spec["replace_above"] = replace_above
        spec["results"] = str(tmp_path / "results.json")
        spec_path = tmp_path / "jobs.json"
        spec_path.write_text(json.dumps(spec))
        subprocess.run([sys.executable, __file__, str(spec_path)], check=True, timeout=120)
        return json.loads(Path(spec["results"]).read_text())

    # Counting run: no kill, learn the sequence of injectable I/O calls.
    counted = tmp_path / "counted"
    trace_path = tmp_path / "trace.json"
    job = {"dir": str(counted), "kill_at": None, "torn": False, "seed": 0, "trace": str(trace_path)}
    assert run_children([job]) == [0]
    trace: list[str] = json.loads(trace_path.read_text())
    k = len(trace)
    # Merged runs make few calls; every one of them is a kill point below (clean and torn).
    # The first rename commits the journal; the others put staged files in place.
    renames = 1 + (len(model.files) if replace_above == 0 else 0)
    assert k >= 10 and trace.count("replace") == renames and trace.count("pwrite") >= 4
    assert snapshot(model, counted) == expected_new_files(model, old_files)

    # Every point, clean (killed just before the call); the writes also torn (a random
    # prefix of the data reaches the file, then the kill).
    jobs = [
        {"dir": str(tmp_path / f"kill-{i}-{torn}"), "kill_at": i, "torn": torn, "seed": i}
        for i, kind in enumerate(trace)
        for torn in ([False, True] if kind in ("pwrite", "journal.write") else [False])
    ]
    statuses = run_children(jobs)
    assert statuses == [-signal.SIGKILL] * len(jobs), "a child did not die at its kill point"

    commit = trace.index("replace")  # rename of the journal: the commit point
    outcomes: Counter[str] = Counter()
    for job in jobs:
        killed = Model(Path(job["dir"]), model.files, model.old, model.new, model.dirty)
        recover(killed.dir)
        # Killed before the rename ran: old weights; after it: new ones (module docstring).
        which: Literal["old", "new"] = "old" if job["kill_at"] <= commit else "new"
        context = {**job, "call": trace[job["kill_at"]]}
        assert_holds(killed, which, context)
        assert no_journal(killed.dir), context
        outcomes[which] += 1
    assert outcomes["old"] > 0 and outcomes["new"] > 0
    print(f"K={k} injection points {dict(Counter(trace))}, {len(jobs)} kills: {dict(outcomes)}")


def _sync_with_faults(
    job: dict[str, Any], new: dict[str, torch.Tensor], block: int, replace_above: float
) -> list[str]:
    """Run one sync, SIGKILLing this process before injectable I/O call `kill_at`.

    Returns the calls made (only reached when the sync is not killed).
    """
    trace: list[str] = []
    rng = random.Random(job["seed"])

    def point(kind: str, tear: Callable[[Callable[[int], int]], object]) -> None:
        if len(trace) == job["kill_at"]:
            if job["torn"]:
                tear(lambda n: rng.randrange(1, n) if n > 1 else 0)
            os.kill(os.getpid(), signal.SIGKILL)
        trace.append(kind)

    def no_tear(_: Callable[[int], int]) -> None:
        pass

    real_pwrite, real_fsync = os.pwrite, os.fsync
    real_replace, real_unlink = os.replace, os.unlink
    real_path_open = pathlib.Path.open

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        point("pwrite", lambda cut: real_pwrite(fd, data[: cut(len(data))], offset))
        return real_pwrite(fd, data, offset)

    def fsync(fd: int) -> None:
        point("fsync", no_tear)
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        point("replace", no_tear)
        real_replace(src, dst)

    def unlink(path: Any) -> None:
        point("unlink", no_tear)
        real_unlink(path)

    class FaultyFile:
        """The journal's file object: its writes and flush are kill points too."""

        def __init__(self, f: Any) -> None:
            self._f = f

        def write(self, data: bytes) -> int:
            def tear(cut: Callable[[int], int]) -> None:
                self._f.write(data[: cut(len(data))])
                self._f.flush()  # the prefix reaches the OS; the kill loses the rest

            point("journal.write", tear)
            return self._f.write(data)

        def flush(self) -> None:
            point("journal.flush", no_tear)
            self._f.flush()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

        def __enter__(self) -> FaultyFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.__exit__(*exc)

    def path_open(self: pathlib.Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_path_open(self, mode, *args, **kwargs)
        writing = "w" in mode or "x" in mode
        return FaultyFile(f) if self.name == TMP_JOURNAL and writing else f

    os.pwrite, os.fsync, os.replace, os.unlink = pwrite, fsync, replace, unlink
    pathlib.Path.open = path_open  # type: ignore[method-assign]
    sync(Path(job["dir"]), new.__getitem__, new.__contains__, block, replace_above)
    return trace


def _fork_server(spec_path: str) -> None:
    """Run each job in a forked child; record how each child ended (-9: SIGKILL)."""
    torch.set_num_threads(1)  # no intra-op thread pool to inherit across fork()
    spec = json.loads(Path(spec_path).read_text())
    new = load_file(spec["new"])
    results = []
    for job in spec["jobs"]:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.alarm(60)  # a hung child dies rather than hanging the test
                trace = _sync_with_faults(job, new, spec["block_size"], spec["replace_above"])
                if job.get("trace"):
                    Path(job["trace"]).write_text(json.dumps(trace))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        results.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    Path(spec["results"]).write_text(json.dumps(results))


# 4. recover on its own ---------------------------------------------------------------------


def test_recover_deletes_files_staged_for_an_uncommitted_sync(model: Model) -> None:
    before = snapshot(model)
    for name in model.files:
        stage_file(model.dir, name, list_tensors(model.dir), model.live, model.dirty.__contains__)
    assert not no_journal(model.dir)  # the staged files are there

    assert recover(model.dir) == "discarded an uncommitted sync"
    assert snapshot(model) == before and no_journal(model.dir)


def test_recover_finishes_a_committed_replacement_idempotently(model: Model) -> None:
    """Killed after the commit with one file renamed and the other not yet: recovery
    renames what is left, and a file already in place stays as it is."""
    staged = {
        name: stage_file(
            model.dir, name, list_tensors(model.dir), model.live, model.dirty.__contains__
        )
        for name in model.files
    }
    write_journal(model.dir, [], staged)
    first = model.files[0]
    os.replace(model.dir / f"{STAGE_PREFIX}{first}.tmp", model.dir / first)

    assert recover(model.dir) == "completed a committed sync"
    assert_holds(model, "new")
    assert no_journal(model.dir)


def test_recover_refuses_a_journal_replacing_a_file_that_is_not_a_weight_file(
    model: Model,
) -> None:
    (model.dir / "config.json").write_text("{}")
    planted = model.dir / f"{STAGE_PREFIX}config.json.tmp"
    planted.write_text('{"planted": 1}')
    write_journal(model.dir, [], {"config.json": file_digest(planted)})
    with pytest.raises(JournalCorrupt, match="not one of the model's weight files"):
        recover(model.dir)
    assert (model.dir / "config.json").read_text() == "{}"


def test_files_are_chosen_for_replacement_by_their_trained_bytes(model: Model) -> None:
    """From the header alone: a file is staged whole exactly when its trained tensors
    hold more than `replace_above` of its bytes."""
    tensors = list_tensors(model.dir)
    trained: dict[str, int] = {}
    for name, entry in tensors.items():
        if name in model.dirty:
            trained[entry.file.name] = trained.get(entry.file.name, 0) + entry.end - entry.begin
    share = {f: n / (model.dir / f).stat().st_size for f, n in trained.items()}
    for f, fraction in share.items():
        below = choose_replacements(tensors, model.dirty.__contains__, fraction * 0.999)
        above = choose_replacements(tensors, model.dirty.__contains__, fraction * 1.001)
        assert f in below and f not in above
    assert choose_replacements(tensors, lambda _: False, 0.0) == []


def test_a_replaced_file_is_a_new_file_and_links_to_the_old_one_keep_it(
    model: Model, tmp_path: Path
) -> None:
    """Staging renames a new file into place: a hard link elsewhere (a copy made with
    `cp -l`) keeps the old bytes, where an in-place write would have changed both."""
    old_files = snapshot(model)
    links = {name: tmp_path / name for name in model.files}
    for name, link in links.items():
        os.link(model.dir / name, link)
    result = sync(model.dir, model.live, model.dirty.__contains__, replace_above=0.0)
    assert result.files_replaced == model.files
    assert_holds(model, "new")
    assert {name: link.read_bytes() for name, link in links.items()} == old_files


def test_recover_discards_an_uncommitted_journal(model: Model) -> None:
    before = snapshot(model)
    writes, _ = plan(list_tensors(model.dir), model.live, model.dirty.__contains__)
    write_journal(model.dir, writes)
    # A fully written journal that was never renamed is still uncommitted.
    os.replace(model.dir / JOURNAL, model.dir / TMP_JOURNAL)

    assert recover(model.dir) == "discarded an uncommitted sync"
    assert snapshot(model) == before and no_journal(model.dir)
    assert recover(model.dir) is None


def test_recover_replays_a_committed_journal_idempotently(model: Model) -> None:
    writes, _ = plan(list_tensors(model.dir), model.live, model.dirty.__contains__)
    journal = write_journal(model.dir, writes)
    committed = journal.read_bytes()
    apply_journal(model.dir)
    assert_holds(model, "new")
    # As if killed after the blocks were written but before the journal was unlinked.
    journal.write_bytes(committed)

    assert recover(model.dir) == "completed a committed sync"
    assert_holds(model, "new")
    assert no_journal(model.dir)
    assert recover(model.dir) is None


# 5. A damaged journal is refused ----------------------------------------------------------


def test_recover_refuses_a_journal_with_a_flipped_payload_byte(model: Model) -> None:
    before = snapshot(model)
    writes, _ = plan(list_tensors(model.dir), model.live, model.dirty.__contains__)
    journal = write_journal(model.dir, writes)
    raw = bytearray(journal.read_bytes())
    raw[-1 - len(writes[-1].data) // 2] ^= 0x01  # a byte inside the last block's payload
    journal.write_bytes(bytes(raw))

    with pytest.raises(JournalCorrupt):
        recover(model.dir)
    assert snapshot(model) == before


def test_recover_refuses_a_journal_with_a_flipped_offset(model: Model) -> None:
    before = snapshot(model)
    writes, _ = plan(list_tensors(model.dir), model.live, model.dirty.__contains__)
    journal = write_journal(model.dir, writes)
    raw = journal.read_bytes()
    field = f'"offset": {writes[0].offset}'.encode()
    at = raw.index(field) + len(field) - 1  # last digit: still valid JSON, another offset
    journal.write_bytes(raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1 :])

    with pytest.raises(JournalCorrupt):
        recover(model.dir)
    assert snapshot(model) == before


# 6. A model directory that cannot be written ---------------------------------------------


@pytest.mark.parametrize("target", ["file", "directory"])
def test_sync_on_read_only_model_raises_and_changes_nothing(model: Model, target: str) -> None:
    paths = [model.dir / f for f in model.files] if target == "file" else [model.dir]
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in paths}
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        if all(os.access(p, os.W_OK) for p in paths):
            pytest.skip("permissions do not bind this user (root): see the simulated test")
        before = snapshot(model)
        with pytest.raises(OSError):
            sync(model.dir, model.live, model.dirty.__contains__)
        assert snapshot(model) == before
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def deny_writes(monkeypatch: pytest.MonkeyPatch, model: Model, target: str) -> None:
    """EACCES on writing the weight files or creating files in the directory, as a
    read-only file or directory would give an unprivileged user; works as root too."""
    if target == "file":
        real_open = os.open

        def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if Path(path).name in model.files and flags & (os.O_WRONLY | os.O_RDWR):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
    else:
        real_path_open = pathlib.Path.open

        def path_open(self: pathlib.Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if self.parent == model.dir and not self.exists() and ("w" in mode or "x" in mode):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_path_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "open", path_open)


@pytest.mark.parametrize("target", ["file", "directory"])
def test_sync_with_writes_denied_raises_and_changes_nothing(
    model: Model, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    before = snapshot(model)
    deny_writes(monkeypatch, model, target)
    with pytest.raises(OSError):
        sync(model.dir, model.live, model.dirty.__contains__)
    assert snapshot(model) == before


def test_full_disk_while_journaling_changes_nothing(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC before the commit point: no journal (not even a .tmp), files untouched."""
    before = snapshot(model)
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".journal.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        sync(model.dir, model.live, model.dirty.__contains__)
    assert snapshot(model) == before and no_journal(model.dir)
    assert not list(model.dir.glob(".livetrain-sync.journal*"))


def test_failed_sync_on_read_only_file_leaves_no_committed_journal(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    deny_writes(monkeypatch, model, "file")
    with pytest.raises(OSError):
        sync(model.dir, model.live, model.dirty.__contains__)
    assert no_journal(model.dir)


# 7. Planted files and short writes -------------------------------------------------------


@pytest.mark.parametrize("target", ["../outside.safetensors", "config.json", "range"])
def test_recover_refuses_a_checksummed_journal_aimed_elsewhere(model: Model, target: str) -> None:
    """A journal with a valid checksum (anyone who can write the folder can make one) may
    only write inside the model's own weight files."""
    outside = model.dir.parent / "outside.safetensors"
    outside.write_bytes(b"\0" * 64)
    (model.dir / "config.json").write_text("{}")
    before = {**snapshot(model), "outside": outside.read_bytes()}
    size = (model.dir / model.files[0]).stat().st_size
    name, offset = (model.files[0], size - 2) if target == "range" else (target, 0)
    write_journal(model.dir, [BlockWrite(name, offset, b"\xff" * 8)])

    with pytest.raises(JournalCorrupt, match="refusing to apply it"):
        recover(model.dir)
    assert {**snapshot(model), "outside": outside.read_bytes()} == before
    assert (model.dir / "config.json").read_text() == "{}"


def test_an_index_naming_files_outside_the_folder_is_refused(model: Model) -> None:
    index = model.dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match="not a .safetensors file in the folder"):
        sync(model.dir, model.live, model.dirty.__contains__)


def test_the_journal_is_never_written_through_a_planted_symlink(model: Model) -> None:
    victim = model.dir.parent / "victim"
    victim.write_bytes(b"keep")
    (model.dir / TMP_JOURNAL).symlink_to(victim)
    writes, _ = plan(list_tensors(model.dir), model.live, model.dirty.__contains__)
    with pytest.raises(FileExistsError):
        write_journal(model.dir, writes)
    assert victim.read_bytes() == b"keep"
    sync(model.dir, model.live, model.dirty.__contains__)  # recovery removes the link first
    assert victim.read_bytes() == b"keep"
    assert_holds(model, "new")


def test_short_pwrites_are_continued_until_every_byte_is_written(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pwrite may write less than asked (Linux: at most ~2 GiB per call)."""
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_pwrite(fd, data[:100], offset))
    sync(model.dir, model.live, model.dirty.__contains__, block_size=512)
    assert_holds(model, "new")


def test_symlinked_weight_files_are_refused_with_the_reason(model: Model, tmp_path: Path) -> None:
    """A Hugging Face cache snapshot: every file a link to a shared blob."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for name in model.files:
        (model.dir / name).rename(blobs / name)
        (model.dir / name).symlink_to(blobs / name)
    before = {name: (blobs / name).read_bytes() for name in model.files}
    with pytest.raises(UnsafeModelDir, match="symlink"):
        sync(model.dir, model.live, model.dirty.__contains__)
    assert {name: (blobs / name).read_bytes() for name in model.files} == before


SERVER_CHILD = """
import sys
from pathlib import Path
from livetrain.checkpoint.lock import ModelInUse, claim_for_server
try:
    claim_for_server(Path(sys.argv[1]))
except ModelInUse as e:
    print(e)
    sys.exit(3)
"""


def test_a_second_server_on_one_model_folder_is_refused(model: Model) -> None:
    """The lock is the kernel's (flock): another process is refused, naming the holder,
    until the holder closes it or dies."""
    fd = claim_for_server(model.dir)
    assert fd is not None
    second = subprocess.run(
        [sys.executable, "-c", SERVER_CHILD, str(model.dir)], capture_output=True, text=True
    )
    assert second.returncode == 3 and f"pid {os.getpid()}" in second.stdout
    os.close(fd)
    again = subprocess.run(
        [sys.executable, "-c", SERVER_CHILD, str(model.dir)], capture_output=True
    )
    assert again.returncode == 0


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_a_read_only_model_folder_needs_no_lock(
    model: Model, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Nothing is ever synced into a folder this user cannot write (simulated: root
    ignores permissions); loading it takes no lock either."""
    real_open = os.open

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path).name in (SERVER_LOCK, FOLDER_LOCK):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    assert claim_for_server(model.dir) is None
    with settled(model.dir):
        assert not (model.dir / FOLDER_LOCK).exists()


WRITER_CHILD = """
import sys
from pathlib import Path
from livetrain.checkpoint.lock import writing
with writing(Path(sys.argv[1]), "checkpoint sync"):
    print("holding", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def held_in(model_dir: Path, script: str) -> Any:
    """Another process holding the folder lock (`script`: WRITER_CHILD as a sync does,
    READER_CHILD as a loader does) until the block ends."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(model_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "holding\n"
        yield child
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait(timeout=30)


def waits_for(
    caplog: pytest.LogCaptureFixture, work: Callable[[], object], holder: str
) -> threading.Thread:
    """Start `work` in a thread and return once it logged that it waits for `holder`."""
    thread = threading.Thread(target=work)
    with caplog.at_level(logging.WARNING, logger="livetrain.lock"):
        thread.start()
        deadline = time.monotonic() + 30
        while f"waiting for {holder}" not in caplog.text:
            assert thread.is_alive() and time.monotonic() < deadline, caplog.text
            time.sleep(0.01)
    return thread


def test_recovery_waits_for_a_sync_in_progress_instead_of_deleting_its_staging(
    model: Model, caplog: pytest.LogCaptureFixture
) -> None:
    """The restart race: a new server's worker recovers the folder while the old
    trainer's exit sync has staged a file. It must wait (naming the writer), not
    delete the staging; then the finished sync's weights are what it loads."""
    staged = model.dir / f"{STAGE_PREFIX}{model.files[0]}{STAGE_SUFFIX}"
    with held_in(model.dir, WRITER_CHILD) as writer:
        stage_file(
            model.dir, model.files[0], list_tensors(model.dir), model.live, model.dirty.__contains__
        )
        loaded: list[dict[str, bytes]] = []

        def load() -> None:
            with settled(model.dir):
                loaded.append(snapshot(model))

        loader = waits_for(caplog, load, f"pid {writer.pid} (checkpoint sync)")
        assert staged.exists() and not loaded  # still waiting, staging intact
    loader.join(timeout=30)
    # The writer ended without committing (it stands in for a killed sync): the staging
    # was discarded under the lock and the old files loaded, whole.
    assert loaded == [snapshot(model)] and not staged.exists()


def test_readers_share_the_folder_and_a_writer_waits_for_them(
    model: Model, caplog: pytest.LogCaptureFixture
) -> None:
    """Tensor-parallel workers load at once; a sync waits until they have read."""
    synced: list[SyncResult] = []
    with held_in(model.dir, READER_CHILD):
        with settled(model.dir):  # a second reader is not held up
            pass
        syncing = waits_for(
            caplog,
            lambda: synced.append(sync(model.dir, model.live, model.dirty.__contains__)),
            "a process reading the weights",
        )
        assert not synced
        assert_holds(model, "old")
    syncing.join(timeout=30)
    assert synced and synced[0].files
    assert_holds(model, "new")


READER_CHILD = """
import sys
from pathlib import Path
from livetrain.checkpoint.sync import settled
with settled(Path(sys.argv[1])):
    print("holding", flush=True)
    sys.stdin.read()
"""


def test_a_committed_journal_whose_staged_file_vanished_is_an_error(model: Model) -> None:
    """Never "already renamed" unless the original proves it: the journal is kept and
    no file changes."""
    staged = {
        name: stage_file(
            model.dir, name, list_tensors(model.dir), model.live, model.dirty.__contains__
        )
        for name in model.files
    }
    write_journal(model.dir, [], staged)
    os.unlink(model.dir / f"{STAGE_PREFIX}{model.files[-1]}{STAGE_SUFFIX}")
    before = snapshot(model)
    with pytest.raises(StagedFileLost, match=f"{model.files[-1]} does not hold"):
        recover(model.dir)
    assert snapshot(model) == before and (model.dir / JOURNAL).exists()


def test_a_committed_journal_whose_staged_file_changed_is_an_error(model: Model) -> None:
    name = model.files[0]
    staged = {
        name: stage_file(
            model.dir, name, list_tensors(model.dir), model.live, model.dirty.__contains__
        )
    }
    write_journal(model.dir, [], staged)
    path = model.dir / f"{STAGE_PREFIX}{name}{STAGE_SUFFIX}"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    before = snapshot(model)
    with pytest.raises(StagedFileLost, match="is not what the sync staged"):
        recover(model.dir)
    assert snapshot(model) == before


# ---- through real vLLM restarts ----------------------------------------------------

# The same fp32 weights served by two vLLM processes: only run-to-run kernel noise.
RESTART_ATOL = 1e-5


@pytest.mark.server
def test_train_sync_restart_continue_then_kill(models, tmp_path_factory):
    """Steps synced by hand come back on restart, optimizer state with them, so the
    next step equals the uninterrupted run's; automatic syncs follow a burst once; a
    SIGKILL then loses exactly the steps after the last sync and leaves no journal."""
    workdir = tmp_path_factory.mktemp("ckpt")
    model = shutil.copytree(models["llama"], workdir / "model")
    layout = {n: (e.dtype, e.shape, e.begin, e.end) for n, e in list_tensors(model).items()}
    size = (model / "model.safetensors").stat().st_size
    serve = contextlib.contextmanager(start_server)

    # No automatic sync on the first server, so the manual one below is the only one.
    with serve(model, workdir, None, env={"LIVETRAIN_SYNC_DELAY_S": "0"}) as first:
        context = first.tokenize("Snow fell on the station roof and")
        continuation = first.tokenize(" the last train waited with its doors open.")
        for _ in range(3):
            first.train(context, continuation, lr=3e-3, retrain=True).raise_for_status()
        synced = first.continuation_logprobs(context, continuation)
        reply = first.http.post("/checkpoint").raise_for_status().json()
        assert reply["weight_version"] == 3 and reply["files"] == ["model.safetensors"]
        trained = sum(e.end - e.begin for n, e in list_tensors(model).items() if "proj" in n)
        if trained > REPLACE_ABOVE * size:  # staged whole, from the live tensors
            assert reply["files_replaced"] == reply["files"] and reply["bytes_written"] == size
        else:
            assert 0 < reply["blocks_changed"] <= reply["blocks_total"]
        assert reply["tensors_skipped"] == 7  # frozen: embeddings, lm_head, 5 norms
        again = first.http.post("/checkpoint", json={}).raise_for_status().json()
        assert again["blocks_changed"] == 0 and again["bytes_written"] == 0
        # The uninterrupted run's next step, to compare with the restarted one.
        first.train(context, continuation, lr=3e-3, retrain=True).raise_for_status()
        uninterrupted = first.continuation_logprobs(context, continuation)

    assert {n: (e.dtype, e.shape, e.begin, e.end) for n, e in list_tensors(model).items()} == (
        layout
    )
    assert (model / "model.safetensors").stat().st_size == size

    with serve(model, workdir, None, env={"LIVETRAIN_SYNC_DELAY_S": "3"}) as second:
        status = second.status()
        assert status["weight_version"] == 3 and status["steps"] == 3
        assert status["trainer"]["resumed_from_version"] == 3
        np.testing.assert_allclose(
            second.continuation_logprobs(context, continuation), synced, atol=RESTART_ATOL
        )
        # The trained-sample record came back with the checkpoint.
        assert second.train(context, continuation, lr=3e-3).status_code == 409
        for _ in range(3):  # a burst: the automatic sync fires once, after the last step
            reply = (
                second.train(context, continuation, lr=3e-3, retrain=True).raise_for_status().json()
            )
            if reply["weight_version"] == 4:
                resumed = second.continuation_logprobs(context, continuation)
        np.testing.assert_allclose(resumed, uninterrupted, atol=RESTART_ATOL)
        assert second.status()["sync_pending"] is True
        deadline = time.monotonic() + 60
        while (status := second.status())["syncs"] == 0:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        # No timer is armed once it has fired: a second automatic sync could not come.
        status = second.status()
        assert status["syncs"] == 1 and status["last_sync"]["weight_version"] == 6
        assert status["bytes_synced"] > 0 and not status["sync_pending"]
        assert status["sync_due_in_s"] is None
        last_synced = second.continuation_logprobs(context, continuation)
        second.train(context, continuation, lr=3e-3, retrain=True).raise_for_status()
        lost = second.continuation_logprobs(context, continuation)
        kill_server(second, signal.SIGKILL)
    assert_files_hold(model, (context, continuation), last_synced, not_=lost)


def wait_gone(pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, f"process {pid} still running"
        time.sleep(0.1)


def assert_files_hold(
    model: Path, sample: tuple[list[int], list[int]], served: list[float], not_: list[float]
) -> None:
    """The files give what a server served at one version (`served`) and not at another,
    by Hugging Face, and no journal is left behind."""
    on_disk = files_logprobs(model, *sample)
    np.testing.assert_allclose(on_disk, served, atol=RESTART_ATOL * 10)
    assert np.abs(np.asarray(on_disk) - np.asarray(not_)).max() > 1e-3
    assert no_journal(model)


def kill_server(client: LivetrainClient, sig: signal.Signals) -> None:
    """Signal the server's process group (as a service manager stops it) and wait until
    the trainer is gone too."""
    trainer = client.status()["trainer_pid"]
    os.killpg(client.server.process.pid, sig)
    client.server.process.wait(timeout=60)
    wait_gone(trainer)


@pytest.mark.server
def test_a_gracefully_stopped_server_syncs_what_it_has_not(models, tmp_path_factory):
    """SIGTERM (vLLM's graceful shutdown, sent to the process group): the trainer syncs
    the steps since the last sync before it exits. (SIGKILL: the restart test.)"""
    workdir = tmp_path_factory.mktemp("sigterm")
    model = shutil.copytree(models["llama"], workdir / "model")
    serve = contextlib.contextmanager(start_server)
    with serve(model, workdir, None) as client:  # automatic syncs on (600 s)
        context = client.tokenize("The ferry horn sounded twice and")
        continuation = client.tokenize(" the harbour woke to gulls.")
        client.train(context, continuation, lr=3e-3, retrain=True).raise_for_status()
        client.http.post("/checkpoint").raise_for_status()
        synced = client.continuation_logprobs(context, continuation)
        client.train(context, continuation, lr=3e-3, retrain=True).raise_for_status()
        latest = client.continuation_logprobs(context, continuation)
        kill_server(client, signal.SIGTERM)
    assert_files_hold(model, (context, continuation), latest, not_=synced)


class CreationWatch:
    """Linux inotify on one folder: wait for a file whose name passes a test to be
    created (the moment it is opened, before its first byte is written)."""

    IN_CREATE, IN_CLOEXEC = 0x100, 0o2000000

    def __init__(self, folder: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert self.libc.inotify_add_watch(self.fd, bytes(folder), self.IN_CREATE) >= 0

    def wait(self, wanted: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], left)[0]:
                break
            events, pos = os.read(self.fd, 65536), 0
            while pos < len(events):
                _, _, _, length = struct.unpack_from("iIII", events, pos)
                name = events[pos + 16 : pos + 16 + length].rstrip(b"\0").decode()
                pos += 16 + length
                if wanted(name):
                    return name
        raise TimeoutError("no such file was created")

    def close(self) -> None:
        os.close(self.fd)


def _sync_file(name: str) -> bool:
    return name.startswith(STAGE_PREFIX) or name == TMP_JOURNAL


@pytest.mark.server
def test_a_server_restarted_at_once_serves_what_the_exit_sync_wrote(tmp_path_factory):
    """`systemctl restart`: SIGTERM a server with unsynced steps and start a new one on
    the same folder at once. The old trainer's exit sync is frozen (SIGSTOP) the moment
    it creates its first file, and thawed only once the new server has reached the
    folder (it says whom it waits for; on the old code it loaded and came up instead).
    The new server then serves exactly what that sync wrote, nothing staged is lost,
    and the files hold the new weights, whole."""
    workdir = tmp_path_factory.mktemp("restart-race")
    # A model whose sync takes long enough to be caught in the act (~60 MB of weights).
    shape = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8)
    model = build_tiny_model(workdir / "model", "llama", config_overrides=shape)
    serve = contextlib.contextmanager(start_server)
    with serve(model, workdir, None) as first:  # automatic syncs on: it syncs on exit
        context = first.tokenize("The night porter locked the gate and")
        continuation = first.tokenize(" counted the lanterns on the hill.")
        before = first.continuation_logprobs(context, continuation)
        for _ in range(2):
            first.train(context, continuation, lr=3e-3, retrain=True).raise_for_status()
        latest = first.continuation_logprobs(context, continuation)
        trainer = first.status()["trainer_pid"]
        watch = CreationWatch(model)
        try:
            os.killpg(first.server.process.pid, signal.SIGTERM)
            created = watch.wait(_sync_file, timeout=60)
            os.kill(trainer, signal.SIGSTOP)
        finally:
            watch.close()
        first.server.process.wait(timeout=60)
    assert (model / created).exists(), "the exit sync finished before it was frozen"
    (workdir / "server.log").rename(workdir / "first.log")

    started: list[Any] = []
    starting = start_server(model, workdir, None)
    thread = threading.Thread(target=lambda: started.append(next(starting)), daemon=True)
    try:
        thread.start()
        log = workdir / "server.log"
        deadline = time.monotonic() + 300
        while f"waiting for pid {trainer} (exit sync)" not in (
            log.read_text() if log.exists() else ""
        ):
            assert thread.is_alive() and time.monotonic() < deadline, "it did not wait"
            time.sleep(0.2)
        assert (model / created).exists()  # the waiting server left the staging alone
    finally:
        os.kill(trainer, signal.SIGCONT)
    wait_gone(trainer)
    thread.join(timeout=300)
    (second,) = started
    try:
        served = second.continuation_logprobs(context, continuation)
        np.testing.assert_allclose(served, latest, atol=RESTART_ATOL)
        status = second.status()
        assert status["state"] == "idle" and status["weight_version"] == 2, status
    finally:
        starting.close()
    assert_files_hold(model, (context, continuation), latest, not_=before)
    assert not list(model.glob(f"{STAGE_PREFIX}*"))


@pytest.mark.server
def test_a_failed_automatic_sync_shows_in_the_status_and_is_retried(models, tmp_path_factory):
    """A model folder whose weight files are symlinks (as in a Hugging Face cache) is
    refused for syncing: the automatic sync's failure is reported and retried, the
    files stay as they were, and serving goes on."""
    workdir = tmp_path_factory.mktemp("badsync")
    model = shutil.copytree(models["llama"], workdir / "model")
    blob = workdir / "blob.safetensors"
    (model / "model.safetensors").rename(blob)
    (model / "model.safetensors").symlink_to(blob)
    before = blob.read_bytes()
    serve = contextlib.contextmanager(start_server)
    with serve(model, workdir, None, env={"LIVETRAIN_SYNC_DELAY_S": "1"}) as client:
        context, continuation = client.tokenize("Fog on the pier"), client.tokenize(" again.")
        client.train(context, continuation, lr=1e-3, retrain=True).raise_for_status()
        deadline = time.monotonic() + 60
        while ((status := client.status())["sync_error"] or {}).get("failures", 0) < 2:
            assert time.monotonic() < deadline, status  # retried (after 1 s here)
            time.sleep(0.2)
        assert "symlink" in status["sync_error"]["reason"] and status["syncs"] == 0
        assert status["sync_pending"] and status["state"] == "idle"
        manual = client.http.post("/checkpoint")
        assert manual.status_code == 500 and "symlink" in manual.json()["error"]["message"]
        # every failure counted, automatic (retried each second) or asked for; no sync
        label = frozenset({("model_name", client.model)})
        low = client.status()["sync_error"]["failures"] + 1
        scraped = client.metrics()
        high = client.status()["sync_error"]["failures"] + 1
        assert low <= scraped[("livetrain_sync_errors_total", label)] <= high
        assert scraped[("livetrain_sync_seconds_count", label)] == 0
    assert blob.read_bytes() == before


def test_checkpoint_rejects_unknown_fields(llama_server):
    reply = llama_server.http.post("/checkpoint", json={"force": True})
    assert reply.status_code == 422 and reply.json()["error"]["field"] == "force"


if __name__ == "__main__":
    _fork_server(sys.argv[1])
