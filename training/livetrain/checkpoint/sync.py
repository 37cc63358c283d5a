"""Write live weights back into a model's safetensors: changed blocks only, crash-safe.

Diff: each checkpoint tensor is compared with the live one (cast to the file's dtype)
in file-aligned blocks (4 KiB by default); only differing blocks are written, adjacent
ones merged into a single write. Tensors that training never touched are skipped
without being read. A file where trained tensors make up more than `replace_above` of
the bytes is not compared at all: under dense updates nearly every one of its blocks
changes, so it is written once, whole, from the live tensors (staged, below).

Crash safety, without copying whole files (ext4 has no reflinks): a redo journal.
  0. every file to be written is opened for writing (fail before committing anything);
     a file chosen for replacement is staged whole as `<dir>/.livetrain-stage.<name>.tmp`
     and fsynced (writing it once costs less than journaling its blocks and then
     writing them again)
  1. the changed blocks, where they go, each staged file's name, size and SHA-256, and a
     SHA-256 over all of it go to `<dir>/.livetrain-sync.journal.tmp`, which is fsynced
     and renamed to `.livetrain-sync.journal`  <- commit point
  2. staged files are renamed over their originals and the blocks are written in place;
     files and the folder are fsynced
  3. the journal is deleted
`recover(dir)` (run before anything loads the directory and before every sync)
replays a committed journal, which is idempotent: a staged file already renamed is
gone, and its original then holds exactly the size and digest the journal recorded.
A staged file missing otherwise, or different, is an error (something else deleted or
changed it), never taken for "already renamed". An uncommitted journal is deleted
with its staged files. A kill before the commit leaves the old weights; after it, the
new ones once recovered. Headers (names, shapes, dtypes, offsets) are never
rewritten, so every file stays a valid safetensors file.

All of it happens under the folder's write lock (lock.py), and `settled` is how
anything that loads the files waits for a sync in progress: recovering while another
process syncs would delete the files it has staged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from livetrain.checkpoint.files import (
    SAFETENSORS_DTYPES,
    FileTensor,
    list_tensors,
    safetensors_files,
)
from livetrain.checkpoint.lock import reading, writing

JOURNAL = ".livetrain-sync.journal"
STAGE_PREFIX, STAGE_SUFFIX = ".livetrain-stage.", ".tmp"  # never a *.safetensors name
# A file is staged whole when trained tensors hold more than this fraction of its bytes:
# the journal writes each changed byte twice (journal, then in place), staging writes the
# file once, and trained tensors change in nearly every block (bench/RESULTS.md).
REPLACE_ABOVE = 0.5
_MAGIC = b"LTJOURNAL2"  # 1 had no sizes or digests of staged files


class JournalCorrupt(RuntimeError):
    """A committed journal failed its checksum, or names a file or range that is not one
    of the model's weight files; the directory needs a person."""


class StagedFileLost(JournalCorrupt):
    """A committed journal's staged file is gone (or changed) and its original does not
    hold what was staged: something other than the sync deleted or changed it."""


class UnsafeModelDir(RuntimeError):
    """The model folder cannot be written in place safely; the message says why."""


@dataclass(frozen=True)
class BlockWrite:
    """A run of one or more adjacent changed blocks."""

    file: str  # name inside the model directory
    offset: int  # absolute byte offset in the file
    data: bytes


@dataclass(frozen=True)
class StagedFile:
    """What a replacement file must be, as recorded in the journal."""

    size: int
    sha256: str


@dataclass
class SyncResult:
    files: list[str] = field(default_factory=list)
    files_replaced: list[str] = field(default_factory=list)  # staged whole and renamed
    bytes_written: int = 0
    blocks_changed: int = 0
    blocks_total: int = 0
    tensors_skipped: int = 0
    elapsed_ms: float = 0.0


def _live_bytes(tensor: torch.Tensor, entry: FileTensor) -> np.ndarray:
    """The bytes the file should hold for `tensor`: cast to the file dtype, row-major."""
    target = SAFETENSORS_DTYPES[entry.dtype]
    flat = tensor.detach().to(device="cpu", dtype=target).contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def _block_edges(start: int, nbytes: int, block: int) -> np.ndarray:
    """Edges, relative to a tensor at file offset `start`, of the file-aligned blocks it
    touches, clipped to the tensor: a block never straddles a page boundary."""
    edges = np.arange(start - start % block, start + nbytes + block, block) - start
    return np.unique(np.clip(edges, 0, nbytes))


def _changed_runs(
    old: np.ndarray, new: np.ndarray, start: int, block: int
) -> tuple[list[tuple[int, int]], int]:
    """Byte ranges (relative to the tensor) of differing blocks, adjacent ones merged into
    one run (one pwrite, one journal entry), and how many blocks differ in all."""
    edges = _block_edges(start, len(new), block)
    changed = np.add.reduceat(old != new, edges[:-1]) > 0
    flips = np.flatnonzero(np.diff(np.concatenate(([False], changed, [False]))))
    runs = [(int(edges[i]), int(edges[j])) for i, j in zip(flips[::2], flips[1::2], strict=True)]
    return runs, int(changed.sum())


def plan(
    tensors: dict[str, FileTensor],
    live: Callable[[str], torch.Tensor],
    dirty: Callable[[str], bool],
    block_size: int = 4096,
) -> tuple[list[BlockWrite], SyncResult]:
    """Every block whose live bytes differ from the file, and the counts for the reply.
    `tensors`: the model's table (files.list_tensors), read once per sync."""
    result = SyncResult()
    writes: list[BlockWrite] = []
    for name, entry in tensors.items():
        nbytes = entry.end - entry.begin
        result.blocks_total += len(_block_edges(entry.begin, nbytes, block_size)) - 1
        if not dirty(name) or nbytes == 0:
            result.tensors_skipped += 1
            continue
        new = _live_bytes(live(name), entry)
        with entry.file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            old = np.frombuffer(m, dtype=np.uint8, count=nbytes, offset=entry.begin).copy()
        runs, blocks = _changed_runs(old, new, entry.begin, block_size)
        result.blocks_changed += blocks
        for lo, hi in runs:
            writes.append(BlockWrite(entry.file.name, entry.begin + lo, new[lo:hi].tobytes()))
    result.bytes_written = sum(len(w.data) for w in writes)
    result.files = sorted({w.file for w in writes})
    return writes, result


def staged_name(name: str) -> str:
    return f"{STAGE_PREFIX}{name}{STAGE_SUFFIX}"


def choose_replacements(
    tensors: dict[str, FileTensor], dirty: Callable[[str], bool], replace_above: float
) -> list[str]:
    """Files where trained tensors hold more than `replace_above` of the file's bytes,
    decided from the header alone: comparing such a file costs a read of every trained
    byte and finds nearly every block changed."""
    trained: dict[Path, int] = {}
    for name, entry in tensors.items():
        if dirty(name):
            trained[entry.file] = trained.get(entry.file, 0) + entry.end - entry.begin
    return sorted(
        file.name
        for file, nbytes in trained.items()
        if nbytes > replace_above * file.stat().st_size
    )


def stage_file(
    model_dir: Path,
    name: str,
    tensors: dict[str, FileTensor],
    live: Callable[[str], torch.Tensor],
    dirty: Callable[[str], bool],
) -> StagedFile:
    """Step 0 for a replaced file: the file as it will be, written once in file order
    (trained tensors from the live ones, everything else copied from the original),
    with its mode, and fsynced; hashed as it is written."""
    source = model_dir / name
    staged = model_dir / staged_name(name)
    entries = sorted(
        (e for e in tensors.values() if e.file.name == name and dirty(e.name)),
        key=lambda e: e.begin,
    )
    mode = source.stat().st_mode & 0o7777
    digest = hashlib.sha256()

    def put(data: bytes | memoryview, offset: int) -> None:
        digest.update(data)
        _pwrite_all(fd, data, offset)

    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with (
            source.open("rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
            memoryview(m) as old,
        ):
            pos = 0
            for entry in entries:
                put(old[pos : entry.begin], pos)
                put(_live_bytes(live(entry.name), entry).data, entry.begin)
                pos = entry.end
            put(old[pos:], pos)
            size = len(old)
        os.fchmod(fd, mode)  # the umask may have narrowed it
        os.fsync(fd)
    except BaseException:
        os.unlink(staged)
        raise
    finally:
        os.close(fd)
    return StagedFile(size, digest.hexdigest())


def file_digest(path: Path) -> StagedFile:
    """Size and SHA-256 of a file, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
        return StagedFile(f.tell(), digest.hexdigest())


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(table: list[dict], staged: dict[str, dict], payload: bytes) -> str:
    """Covers where every block goes, and which files are replaced by what, as well as
    the blocks' bytes: a flipped offset or name is corruption.

    The table is hashed in a canonical form, so the digest is checked against what
    the reader actually parsed.
    """
    listing = {"writes": table, "staged": staged}
    canonical = json.dumps(listing, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(struct.pack("<Q", len(canonical)) + canonical + payload).hexdigest()


def _check_writable(model_dir: Path, names: list[str]) -> None:
    """Fail before the commit point: a committed journal that cannot be applied would
    block every later load of the directory. A read-only file is refused even where
    the folder would allow replacing it: someone made it read-only."""
    for name in names:
        os.close(os.open(model_dir / name, os.O_WRONLY | os.O_NOFOLLOW))


def check_in_place_safe(model_dir: Path) -> None:
    """Refuse weight files that are symlinks: a Hugging Face cache snapshot links each
    file to a blob other snapshots share, and an in-place write would change them all."""
    for path in safetensors_files(model_dir):
        if path.is_symlink():
            raise UnsafeModelDir(
                f"{path} is a symlink (a Hugging Face cache folder?); livetrain writes weights "
                "in place and would change every snapshot that shares it: serve a copy of "
                "the model in a folder of its own (huggingface-cli download --local-dir DIR)"
            )


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite until every byte is written (Linux writes at most ~2 GiB per call)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, f"pwrite wrote nothing at offset {offset}")
        view, offset = view[written:], offset + written


def write_journal(
    model_dir: Path, writes: list[BlockWrite], staged: dict[str, StagedFile] | None = None
) -> Path:
    """Step 1: the journal, durable and then committed by rename. `writes` are the
    in-place blocks; `staged` the files already staged whole (by name)."""
    listing = {name: {"size": f.size, "sha256": f.sha256} for name, f in (staged or {}).items()}
    payload = b"".join(w.data for w in writes)
    table = [{"file": w.file, "offset": w.offset, "length": len(w.data)} for w in writes]
    digest = _digest(table, listing, payload)
    header = json.dumps({"writes": table, "staged": listing, "sha256": digest}).encode()
    tmp = model_dir / f"{JOURNAL}.tmp"
    try:
        with tmp.open("xb") as f:  # exclusive: never through a symlink planted there
            f.write(_MAGIC + struct.pack("<Q", len(header)) + header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: nothing was committed
        raise
    final = model_dir / JOURNAL
    os.replace(tmp, final)
    fsync_path(model_dir)
    return final


def _read_journal(path: Path) -> tuple[list[BlockWrite], dict[str, StagedFile]]:
    raw = path.read_bytes()
    if not raw.startswith(_MAGIC):
        raise JournalCorrupt(f"{path}: not a journal this livetrain version writes")
    try:
        (length,) = struct.unpack("<Q", raw[len(_MAGIC) : len(_MAGIC) + 8])
        start = len(_MAGIC) + 8
        header = json.loads(raw[start : start + length])
        table, listing, payload = header["writes"], header["staged"], raw[start + length :]
        if _digest(table, listing, payload) != header["sha256"]:
            raise ValueError("checksum mismatch")
        writes, pos = [], 0
        for w in table:
            writes.append(BlockWrite(w["file"], w["offset"], payload[pos : pos + w["length"]]))
            pos += w["length"]
        _check_targets(path.parent, table, list(listing))
        staged = {name: StagedFile(f["size"], f["sha256"]) for name, f in listing.items()}
    except (ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise JournalCorrupt(f"{path}: {exc}; refusing to apply it") from None
    return writes, staged


def _check_targets(model_dir: Path, table: list[dict], replaced: list[str]) -> None:
    """Every write lands inside one of the model's own weight files, and only those are
    replaced (a journal planted in the folder must not write anywhere else), so
    checksums alone are not enough."""
    sizes = {p.name: p.stat().st_size for p in safetensors_files(model_dir)}
    for name in replaced:
        if name not in sizes:
            raise ValueError(f"{name!r} is not one of the model's weight files")
    for w in table:
        name, offset, length = w["file"], w["offset"], w["length"]
        if name not in sizes:
            raise ValueError(f"{name!r} is not one of the model's weight files")
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0):
            raise ValueError(f"bad range {offset!r}+{length!r} in {name}")
        if length < 0 or offset + length > sizes[name]:
            raise ValueError(f"range {offset}+{length} is outside {name} ({sizes[name]} bytes)")


def _staged_in_place(model_dir: Path, staged: dict[str, StagedFile], recovering: bool) -> list[str]:
    """The staged files still to rename, after checking every one before anything is
    changed. A staged file must have its recorded size (and, when recovering from a
    journal, digest); one that is gone must already be in place, which its original
    then proves by holding that size and digest. Anything else raises StagedFileLost."""
    pending = []
    for name, expected in staged.items():
        path = model_dir / staged_name(name)
        if path.exists():
            size = path.stat().st_size
            if size == expected.size and (not recovering or file_digest(path) == expected):
                pending.append(name)
                continue
            problem = f"{path.name} is not what the sync staged ({size} bytes)"
        elif file_digest(model_dir / name) == expected:
            continue  # renamed by the run that was interrupted
        else:
            problem = f"{path.name} is gone and {name} does not hold what it staged"
        raise StagedFileLost(
            f"{model_dir}: {problem}; something else deleted or changed it (another "
            f"server recovering this folder?). {name} keeps its old weights; the journal is "
            "kept for a person to inspect"
        )
    return pending


def apply_journal(
    model_dir: Path,
    writes: list[BlockWrite] | None = None,
    staged: dict[str, StagedFile] | None = None,
) -> None:
    """Steps 2 and 3: put the staged files in place, write the committed blocks in place,
    make them durable, forget them.

    `writes` and `staged` are what was just journaled, when the caller still holds
    them; recovery passes None and reads (and checks) them from the journal.
    """
    path = model_dir / JOURNAL
    recovering = writes is None
    if writes is None:
        writes, staged = _read_journal(path)
    for name in _staged_in_place(model_dir, staged or {}, recovering):
        os.replace(model_dir / staged_name(name), model_dir / name)
    by_file: dict[str, list[BlockWrite]] = {}
    for w in writes:
        by_file.setdefault(w.file, []).append(w)
    for name, file_writes in by_file.items():
        fd = os.open(model_dir / name, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            for w in file_writes:
                _pwrite_all(fd, w.data, w.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_path(model_dir)  # the renames are durable before the journal goes
    os.unlink(path)
    fsync_path(model_dir)


def recover(model_dir: Path) -> str | None:
    """Finish or discard an interrupted sync (holding the write lock; after waiting for
    a sync that is running). Returns what was done, or None."""
    model_dir = Path(model_dir)
    with writing(model_dir, "recovering an interrupted sync"):
        return _recover(model_dir)


def _pending(model_dir: Path) -> bool:
    """Is there an interrupted sync to finish or discard?"""
    return (
        (model_dir / JOURNAL).exists()
        or (model_dir / f"{JOURNAL}.tmp").exists()
        or any(model_dir.glob(f"{STAGE_PREFIX}*{STAGE_SUFFIX}"))
    )


@contextmanager
def settled(model_dir: Path) -> Iterator[None]:
    """Hold the folder for reading, with no sync running or interrupted: what vLLM's
    loader wraps around reading the files. Readers share the lock (tensor-parallel
    workers load at once); only a folder that needs recovery takes it exclusively."""
    while True:
        with reading(model_dir, "loading the weights"):
            if not _pending(model_dir):
                yield
                return
        recover(model_dir)


def _recover(model_dir: Path) -> str | None:
    action = None
    if (model_dir / f"{JOURNAL}.tmp").exists():
        os.unlink(model_dir / f"{JOURNAL}.tmp")  # never committed: the files are untouched
        action = "discarded an uncommitted sync"
    if (model_dir / JOURNAL).exists():
        apply_journal(model_dir)
        action = "completed a committed sync"
    if _discard_staged(model_dir):
        action = action or "discarded an uncommitted sync"
    return action


def _discard_staged(model_dir: Path) -> bool:
    """Delete staged files; only ever called with no committed journal, which is the
    one thing that could still need them. True if there were any."""
    staged = list(model_dir.glob(f"{STAGE_PREFIX}*{STAGE_SUFFIX}"))
    for path in staged:
        os.unlink(path)
    return bool(staged)


def sync(
    model_dir: Path,
    live: Callable[[str], torch.Tensor],
    dirty: Callable[[str], bool],
    block_size: int = 4096,
    replace_above: float = REPLACE_ABOVE,
) -> SyncResult:
    """Bring the model files up to date with the live weights (all three steps).
    `blocks_changed` counts the blocks of the files compared, not of those replaced."""
    started = time.perf_counter()
    check_in_place_safe(model_dir)
    with writing(model_dir, "checkpoint sync"):
        return _sync(model_dir, live, dirty, block_size, replace_above, started)


def _sync(
    model_dir: Path,
    live: Callable[[str], torch.Tensor],
    dirty: Callable[[str], bool],
    block_size: int,
    replace_above: float,
    started: float,
) -> SyncResult:
    _recover(model_dir)
    tensors = list_tensors(model_dir)
    replaced = choose_replacements(tensors, dirty, replace_above)
    staged = {n for n, e in tensors.items() if e.file.name in replaced}
    writes, result = plan(tensors, live, lambda n: dirty(n) and n not in staged, block_size)
    # written from the live tensors, so not skipped, though never compared
    result.tensors_skipped -= sum(
        1 for n in staged if dirty(n) and tensors[n].end > tensors[n].begin
    )
    result.files = sorted({*result.files, *replaced})
    if result.files:
        _check_writable(model_dir, result.files)
        try:
            staged_files = {
                name: stage_file(model_dir, name, tensors, live, dirty) for name in replaced
            }
            write_journal(model_dir, writes, staged_files)
        except BaseException:
            if not (model_dir / JOURNAL).exists():  # not committed: the staging is moot
                _discard_staged(model_dir)
            raise
        apply_journal(model_dir, writes, staged_files)
        result.files_replaced = replaced
        result.bytes_written += sum((model_dir / name).stat().st_size for name in replaced)
    result.elapsed_ms = (time.perf_counter() - started) * 1000
    return result
