"""Where each checkpoint tensor lives inside a model's parameters, as a strided view.

Two loaders decide that, and both differ per family: vLLM's (the model class's
`load_weights`: stacked q/k/v rows, gate/up rows, experts fused into 3-D tensors,
padded vocabularies, per-family code such as gpt-oss's transposed experts) and
transformers' (its conversion mapping, which renames and fuses per-expert tensors).
livetrain re-implements neither. It runs them on meta tensors, which carry shapes,
strides and offsets but no data, and follows each checkpoint tensor through the views
and copies the loader makes (`Provenance`). Where a loader only moves elements, the
result is one `Placement` per checkpoint tensor: the parameter, offset and strides at
which its elements lie, so training can share that memory as a view. Where a loader
computes (scales, casts to a packed format, permutes in a way no view can express),
no placement exists and the error names the tensor and the operation: training would
otherwise write values inference never reads.

Used by the vLLM worker (vllm_internals.checkpoint_placements), the trainer (the
Hugging Face skeleton's side, trainer/model.py) and the `livetrain check` preflight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_aten = torch.ops.aten
# Ops that copy elements without computing with them: their output keeps a map back.
_ELEMENT_COPIES = (_aten.clone.default, _aten._to_copy.default)


class MappingError(ValueError):
    """A checkpoint tensor is not a view of the memory that serves it; says which, why."""


@dataclass(frozen=True)
class Placement:
    """The elements of one tensor (shape, row-major) are those at positions
    `offset + sum(i * stride)` of `tensor`, positions counting its elements row-major
    (its logical layout, whatever its strides in memory)."""

    tensor: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def view(self, base: torch.Tensor) -> torch.Tensor:
        """This placement as a view of `base` (the tensor named `tensor`)."""
        dims = list(zip(base.shape, contiguous_strides(base.shape), strict=True))
        found = _locate(self.offset, self.shape, self.stride, dims)
        if found is None:
            raise MappingError(f"{self.tensor}: not a box of a {tuple(base.shape)} tensor")
        origin, along = found
        offset = base.storage_offset() + sum(
            a * s for a, s in zip(origin, base.stride(), strict=True)
        )
        stride = [0 if d is None else base.stride(d) for d in along]
        return base.as_strided(self.shape, stride, offset)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


@dataclass(frozen=True)
class _Dim:
    size: int
    storage_stride: int  # where consecutive elements lie in the tracked storage
    source_stride: int  # ... and in the source tensor (row-major positions)


@dataclass(frozen=True)
class _Layout:
    """Element j of a dense block of a storage, at storage position
    `storage_offset + sum(j * storage_stride)`, is element `source_offset +
    sum(j * source_stride)` of `source`."""

    source: str
    dims: tuple[_Dim, ...]
    storage_offset: int
    source_offset: int


@dataclass(frozen=True)
class Piece:
    """Some elements of a source tensor, and where they landed: the index space
    `shape`, its map into the source (row-major positions) and into `dest`'s storage."""

    source: str
    shape: tuple[int, ...]
    source_offset: int
    source_strides: tuple[int, ...]
    dest: str
    dest_offset: int
    dest_strides: tuple[int, ...]


def _locate(
    offset: int, shape: Sequence[int], strides: Sequence[int], dims: Sequence[tuple[int, int]]
) -> tuple[list[int], list[int | None]] | None:
    """A view (offset, shape, strides) of a dense block whose dims are (size, stride),
    as the block index it starts at and, per view dim, the block dim it runs along;
    None when the view is not such a sub-box (it would need a computed index)."""
    origin = [0] * len(dims)
    order = sorted((d for d, (size, _) in enumerate(dims) if size > 1), key=lambda d: -dims[d][1])
    rest = offset
    for d in order:
        origin[d], rest = divmod(rest, dims[d][1])
        if not 0 <= origin[d] < dims[d][0]:
            return None
    if rest != 0:
        return None
    along: list[int | None] = []
    used: set[int] = set()
    for size, stride in zip(shape, strides, strict=True):
        if size == 1:
            along.append(None)
            continue
        match = next((d for d in order if dims[d][1] == stride and d not in used), None)
        if match is None or origin[match] + size > dims[match][0]:
            return None
        used.add(match)
        along.append(match)
    return origin, along


def _source_map(view: torch.Tensor, layout: _Layout) -> tuple[int, tuple[int, ...]] | None:
    """(source offset, source strides) of a view into a tracked storage."""
    dims = [(d.size, d.storage_stride) for d in layout.dims]
    found = _locate(
        int(view.storage_offset()) - layout.storage_offset, view.shape, view.stride(), dims
    )
    if found is None:
        return None
    origin, along = found
    offset = layout.source_offset + sum(
        a * d.source_stride for a, d in zip(origin, layout.dims, strict=True)
    )
    strides = tuple(0 if d is None else layout.dims[d].source_stride for d in along)
    return offset, strides


def _logical(view: torch.Tensor, base: torch.Tensor) -> tuple[int, tuple[int, ...]] | None:
    """A view of `base`'s memory as (offset, strides) in base's row-major positions."""
    dims = list(zip(base.shape, base.stride(), strict=True))
    found = _locate(
        int(view.storage_offset() - base.storage_offset()), view.shape, view.stride(), dims
    )
    if found is None:
        return None
    origin, along = found
    rows = contiguous_strides(base.shape)
    offset = sum(a * r for a, r in zip(origin, rows, strict=True))
    return offset, tuple(0 if d is None else rows[d] for d in along)


def _key(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage()._cdata)


class Provenance(TorchDispatchMode):
    """Follows tracked tensors through a loader run on meta tensors.

    `track` names a source (a checkpoint tensor's probe, or a model parameter);
    `destination` names memory the loader writes into. Views keep their storage, so
    they stay tracked for free; `clone`/`_to_copy` outputs get a map back to the
    source; a `copy_` into a destination becomes a `Piece` (and writes nothing: the
    tensors are meta). Any other op that reads a tracked tensor is noted, so a value
    the loader computed can be reported by the op that computed it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._layouts: dict[int, _Layout] = {}
        self._dests: dict[int, tuple[str, torch.Tensor]] = {}
        self.computed: dict[str, str] = {}  # source -> what the loader first did to it
        self._computed_keys: dict[int, str] = {}  # storage -> source it was computed from
        self.pieces: list[Piece] = []
        # Storages are keyed by address: holding every keyed tensor keeps an address
        # from being reused by a later tensor while this mode knows it.
        self._held: list[torch.Tensor] = []

    def track(self, name: str, tensor: torch.Tensor) -> None:
        dims = tuple(
            _Dim(size, stride, source)
            for size, stride, source in zip(
                tensor.shape, tensor.stride(), contiguous_strides(tensor.shape), strict=True
            )
        )
        self._layouts[_key(tensor)] = _Layout(name, dims, int(tensor.storage_offset()), 0)
        self._held.append(tensor)

    def destination(self, name: str, tensor: torch.Tensor) -> None:
        self._dests.setdefault(_key(tensor), (name, tensor))
        self._held.append(tensor)

    def source_of(self, tensor: torch.Tensor) -> tuple[str, int, tuple[int, ...]] | None:
        """(source, offset, strides) of a tracked tensor's elements, or None."""
        layout = self._layouts.get(_key(tensor))
        found = None if layout is None else _source_map(tensor, layout)
        return None if found is None or layout is None else (layout.source, *found)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _aten.copy_.default and _key(args[0]) in self._dests:
            self._land(args[0], args[1])
            return args[0]
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        sources = {name for t in inputs if (name := self._source_name(t)) is not None}
        if sources:
            for result in (t for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
                if _key(result) in self._layouts or _key(result) in self._dests:
                    continue  # a view of what it came from
                self._derive(func, inputs, sources, result)
        return out

    def _source_name(self, tensor: torch.Tensor) -> str | None:
        layout = self._layouts.get(_key(tensor))
        return layout.source if layout is not None else self._computed_keys.get(_key(tensor))

    def _derive(
        self, func: Any, inputs: list[torch.Tensor], sources: set[str], result: torch.Tensor
    ) -> None:
        """Give a new tensor made from tracked ones a map back, or note the op."""
        copies = func in _ELEMENT_COPIES
        found = self.source_of(inputs[0]) if copies else None
        if found is not None and result.shape == inputs[0].shape:
            source, offset, strides = found
            dims = tuple(
                _Dim(size, stride, src)
                for size, stride, src in zip(result.shape, result.stride(), strides, strict=True)
            )
            self._layouts[_key(result)] = _Layout(
                source, dims, int(result.storage_offset()), offset
            )
        else:
            done = (
                "reorders it in a way no strided view can express" if copies else "computes with it"
            )
            for source in sources:
                self.computed.setdefault(source, f"{done} ({func})")
            self._computed_keys[_key(result)] = min(sources)
        self._held.append(result)

    def _land(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        found = self.source_of(src)
        if found is None:
            source = self._source_name(src)
            if source is not None:
                self.computed.setdefault(source, "copies it in a way no strided view can express")
            return
        dest, base = self._dests[_key(dst)]
        source, offset, strides = found
        landed = _logical(dst, base)
        if tuple(src.shape) != tuple(dst.shape) or landed is None:
            self.computed.setdefault(source, "copies it in a way no strided view can express")
            return
        self.pieces.append(Piece(source, tuple(dst.shape), offset, strides, dest, *landed))


def assemble(source: str, shape: Sequence[int], pieces: Sequence[Piece]) -> Placement:
    """The placement of a whole source tensor of `shape` from the pieces of it a
    loader moved, or MappingError: pieces in several destinations, pieces that do not
    cover every element exactly once, or that no single strided view can hold."""
    if not pieces:
        raise MappingError(f"{source}: the loader put none of it anywhere")
    dests = {p.dest for p in pieces}
    if len(dests) > 1:
        raise MappingError(f"{source}: split across {sorted(dests)}, not one tensor")
    shape = tuple(shape)
    dims = list(zip(shape, contiguous_strides(shape), strict=True))
    strides: list[int | None] = [None] * len(shape)
    equations: list[tuple[list[int], int]] = []  # (origin, dest offset)
    for piece in pieces:
        found = _locate(piece.source_offset, piece.shape, piece.source_strides, dims)
        if found is None:
            raise MappingError(f"{source}: a piece is not a box of the tensor")
        origin, along = found
        for d, dest_stride in zip(along, piece.dest_strides, strict=True):
            if d is None:
                continue
            if strides[d] not in (None, dest_stride):
                raise MappingError(f"{source}: pieces disagree on the layout of dim {d}")
            strides[d] = dest_stride
        equations.append((origin, piece.dest_offset))
    _check_cover(source, shape, pieces, dims)
    solved, offset = _solve_offsets(source, shape, strides, equations)
    return Placement(pieces[0].dest, offset, shape, solved)


def assemble_part(
    source: str, shape: Sequence[int], pieces: Sequence[Piece]
) -> tuple[tuple[int, ...], Placement]:
    """Where one tensor-parallel rank holds part of a source tensor of `shape`: the box
    of the source its pieces cover (its origin) and that box's placement, as `assemble`
    gives for a whole tensor. A rank that holds all of it (a replicated norm, say)
    gives the zero origin and `assemble`'s placement."""
    dims = list(zip(shape, contiguous_strides(shape), strict=True))
    located = []
    for piece in pieces:
        found = _locate(piece.source_offset, piece.shape, piece.source_strides, dims)
        if found is None:
            raise MappingError(f"{source}: a piece is not a box of the tensor")
        located.append(found)
    if not located:
        raise MappingError(f"{source}: the loader put none of it anywhere")
    low = [min(origin[d] for origin, _ in located) for d in range(len(dims))]
    high = [0] * len(dims)
    for (origin, along), piece in zip(located, pieces, strict=True):
        extent = dict(zip(along, piece.shape, strict=True))
        for d in range(len(dims)):
            high[d] = max(high[d], origin[d] + extent.get(d, 1))
    box = tuple(h - lo for h, lo in zip(high, low, strict=True))
    rows = contiguous_strides(box)
    relative = [
        dataclasses.replace(
            piece,
            source_offset=sum((o - lo) * r for o, lo, r in zip(origin, low, rows, strict=True)),
            source_strides=tuple(0 if d is None else rows[d] for d in along),
        )
        for (origin, along), piece in zip(located, pieces, strict=True)
    ]
    return tuple(low), assemble(source, box, relative)


def _check_cover(
    source: str, shape: tuple[int, ...], pieces: Sequence[Piece], dims: list[tuple[int, int]]
) -> None:
    """Every element of the source lands exactly once (boxes that tile it)."""
    total = sum(math.prod(p.shape) for p in pieces)
    if total != math.prod(shape):
        raise MappingError(f"{source}: the loader placed {total} of {math.prod(shape)} elements")
    boxes = set()
    for piece in pieces:
        found = _locate(piece.source_offset, piece.shape, piece.source_strides, dims)
        assert found is not None  # checked by the caller
        origin, along = found
        extent = [1] * len(shape)
        for d, size in zip(along, piece.shape, strict=True):
            if d is not None:
                extent[d] = size
        boxes.add((tuple(origin), tuple(extent)))
    if len(boxes) != len(pieces) or not _disjoint(sorted(boxes)):
        raise MappingError(f"{source}: the loader placed some elements twice")


def _disjoint(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether no two axis-aligned boxes (origin, extent) overlap. Boxes of one extent
    (one per expert, say) at distinct origins aligned to it cannot; others are compared
    pairwise."""
    extents = {extent for _, extent in boxes}
    if len(extents) == 1:
        (extent,) = extents
        aligned = all(
            o % e == 0 for origin, _ in boxes for o, e in zip(origin, extent, strict=True)
        )
        if aligned and len({origin for origin, _ in boxes}) == len(boxes):
            return True
    for i, (a, ea) in enumerate(boxes):
        for b, eb in boxes[i + 1 :]:
            if all(x < y + ey and y < x + ex for x, ex, y, ey in zip(a, ea, b, eb, strict=True)):
                return False
    return True


def _solve_offsets(
    source: str,
    shape: tuple[int, ...],
    strides: list[int | None],
    equations: list[tuple[list[int], int]],
) -> tuple[tuple[int, ...], int]:
    """Strides of the dims no piece runs along (e.g. the expert index when each piece is
    one expert) and the base offset, from `offset = base + sum(origin * stride)`."""
    (origin0, offset0), *others = equations
    for d in range(len(shape)):
        if strides[d] is not None:
            continue
        if shape[d] == 1:
            strides[d] = 0
            continue
        # the piece that starts one step further along d, all else known, fixes it
        for origin, offset in others:
            delta = [o - o0 for o, o0 in zip(origin, origin0, strict=True)]
            others_known = [(x, strides[k]) for k, x in enumerate(delta) if k != d and x]
            if delta[d] != 0 and all(stride is not None for _, stride in others_known):
                known = sum(x * stride for x, stride in others_known if stride is not None)
                step, rest = divmod(offset - offset0 - known, delta[d])
                if rest == 0:
                    strides[d] = step
                    break
        if strides[d] is None:
            raise MappingError(f"{source}: no strided view holds its dim {d}")
    solved = tuple(int(s) for s in strides)  # type: ignore[arg-type]
    base = offset0 - sum(o * s for o, s in zip(origin0, solved, strict=True))
    for origin, offset in equations:
        if base + sum(o * s for o, s in zip(origin, solved, strict=True)) != offset:
            raise MappingError(f"{source}: its pieces are not one strided view")
    return solved, base


def pieces_by_source(pieces: Sequence[Piece]) -> dict[str, list[Piece]]:
    grouped: dict[str, list[Piece]] = {}
    for piece in pieces:
        grouped.setdefault(piece.source, []).append(piece)
    return grouped


def meta_twin(
    tensor: torch.Tensor, like: torch.Tensor | None = None, share_attributes: bool = False
) -> torch.Tensor:
    """A meta tensor of the same class (vLLM's parameter subclasses included) and
    attributes (e.g. vLLM's `weight_loader`) as `tensor`, with the shape, strides and
    dtype of `like` (default: `tensor`'s own), allocating nothing. `share_attributes`:
    attributes set on `tensor` later appear on the twin too (one attribute dict)."""
    like = tensor if like is None else like
    data = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device="meta")
    twin = torch.Tensor._make_subclass(type(tensor), data, tensor.requires_grad)
    if share_attributes:
        twin.__dict__ = tensor.__dict__
    else:
        twin.__dict__.update(tensor.__dict__)
    return twin


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Construct modules with meta parameters but real buffers and temporaries (RoPE
    tables, ALiBi slopes a constructor reads back), so no weight memory is kept. A
    parameter keeps its class and its attributes, including those its layer sets after
    registering it (vLLM's `set_weight_attrs`)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        # Already-meta parameters are being re-registered (weight tying): keep identity.
        if param is not None and not param.is_meta:
            param = meta_twin(param, share_attributes=True)  # type: ignore[assignment]
        original(module, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


@contextlib.contextmanager
def parameters_replaced(
    module: torch.nn.Module, replacement: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[dict[int, torch.Tensor]]:
    """Within the `with`, every parameter of `module` is `replacement(parameter)` (one
    replacement per parameter object, so tied ones stay tied); yields original id ->
    replacement. The originals are put back even if the body raises."""
    replaced: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    twins: dict[int, torch.Tensor] = {}
    try:
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is None:
                    continue
                if id(param) not in twins:
                    twins[id(param)] = replacement(param)
                replaced.append((owner, name, param))
                owner._parameters[name] = twins[id(param)]  # type: ignore[assignment]
        yield twins
    finally:
        for owner, name, param in replaced:
            owner._parameters[name] = param
