"""APOLLO for weight matrices, AdamW for everything else, in two phases.

APOLLO (Zhu et al. 2024, "APOLLO: SGD-like memory, AdamW-level performance") runs Adam
on a random rank-r projection of each gradient and uses it only to learn a per-channel
(rank 1: per-tensor) rescaling of the raw gradient, so a weight of shape (m, n) costs
2 * r * max(m, n) fp32 moments instead of AdamW's 2 * m * n. The projection matrix is
regenerated from a seed rather than stored.

A 3-D weight (a mixture of experts' fused `[experts, m, n]` tensor) is a batch of
matrices: each expert gets its own moments, channel scales, norm-growth limiter and
update-size check, as if it were a separate 2-D weight; they share one projection
matrix, which only has to be random, so one draw per tensor serves them all. An
expert no token was routed to has a zero gradient and therefore a zero update.

A step is split in two because the caller fences inference only while weights change:
`prepare()` does all the math and every safety check without touching weights or
optimizer state; `apply()` only writes weights and swaps in the new state, so it is
cheap and has nothing left that can fail for numeric reasons.

This is deliberately not a `torch.optim.Optimizer`: its `load_state_dict` casts state to
the parameter dtype, and we keep fp32 moments next to bf16 weights, in a flat,
tensors-only state dict that `torch.load(weights_only=True)` accepts.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from livetrain.config import OptimizerSettings
from livetrain.trainer.shards import Shards, Weight, copy_of

# Added to APOLLO's norm denominators so an all-zero channel gives a zero scale, not NaN.
_NORM_EPS = 1e-8
# Upper bound on the fp32 temporaries apply() allocates per block of a non-fp32 weight.
_BLOCK_ELEMENTS = 1 << 24
_MASK64 = (1 << 64) - 1
_APOLLO_FIELDS = ("exp_avg", "exp_avg_sq", "steps", "prev_update_norm", "rank")
_ADAMW_FIELDS = ("exp_avg", "exp_avg_sq", "steps")


class RefusedUpdate(ValueError):
    """Raised by prepare(); names the offending tensor. Nothing has been modified."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name, reason)  # both in args, so the exception pickles
        self.name = name
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.name}: {self.reason} (nothing was modified)"


class DestructiveUpdate(RefusedUpdate):
    """The step would move a tensor by more than the allowed fraction of its norm, or
    the weight decay factor would not be in (0, 1]."""


class NonFiniteUpdate(RefusedUpdate):
    """A gradient, moment, scale, update norm or resulting weight would not be finite."""


@dataclass(frozen=True)
class ApolloTensorState:
    """Committed APOLLO state of one weight; never mutated, only replaced."""

    exp_avg: torch.Tensor  # fp32, (r, n) if m <= n else (m, r); batch dims first
    exp_avg_sq: torch.Tensor
    steps: int  # steps taken with these moments (restarts when the rank changes)
    rank: int
    prev_update_norm: torch.Tensor  # fp32, post-limiter ||U||_F per matrix; 0 = no history


@dataclass(frozen=True)
class AdamWTensorState:
    """Committed AdamW state of one tensor; never mutated, only replaced."""

    exp_avg: torch.Tensor  # fp32, parameter shape
    exp_avg_sq: torch.Tensor
    steps: int


@dataclass(frozen=True)
class ApolloTensorStep:
    """One weight's precomputed APOLLO step: W <- W * decay - grad * coef."""

    state: ApolloTensorState  # what apply() commits
    grad: torch.Tensor  # the gradient prepare() read and checked (a reference, not a copy)
    scale: torch.Tensor  # s: (1, n), (m, 1), or one per matrix for rank 1
    limiter: torch.Tensor  # per matrix, from the norm-growth limiter; 1 when inactive
    coef: torch.Tensor  # lr * sqrt(settings.scale) * limiter * s, same shape as scale


@dataclass(frozen=True)
class AdamWTensorStep:
    """One tensor's precomputed AdamW step: W <- W * decay - update * coef."""

    state: AdamWTensorState
    update: torch.Tensor  # fp32 m_hat / (sqrt(v_hat) + eps), parameter shape
    coef: torch.Tensor  # 0-d effective lr


@dataclass(frozen=True)
class PendingStep:
    """Everything apply() needs; produced by prepare(), valid for one apply()."""

    step: int  # global step number this will commit (1-based)
    lr: float  # effective lr after warmup
    decay: float  # 1 - lr * weight_decay
    apollo: dict[str, ApolloTensorStep]
    adamw: dict[str, AdamWTensorStep]
    moments_reset: list[str]  # APOLLO weights whose moments restarted for a new rank
    # The updated weights, computed ahead (`Apollo.preview`): apply() then only copies.
    values: dict[str, torch.Tensor] | None = None


def projection(
    name: str,
    shape: tuple[int, int],
    rank: int,
    seed: int,
    refresh_index: int,
    device: torch.device | str,
) -> torch.Tensor:
    """The fp32 (r, min(m, n)) projection for weight `name` of `shape`, r = min(rank, m, n).

    Entries are i.i.d. N(0, 1/r), so E||P x||^2 = ||x||^2: projected norms keep scale.
    It is a pure function of its arguments, which is what lets us regenerate instead of
    storing it; a new `refresh_index` gives an unrelated matrix.
    """
    smaller = min(shape)
    r = min(rank, smaller)
    generator = torch.Generator(device=device)
    generator.manual_seed(_mix_seed(seed, zlib.crc32(name.encode()), refresh_index))
    p = torch.randn(r, smaller, generator=generator, device=device, dtype=torch.float32)
    return p.div_(math.sqrt(r))


def _mix_seed(*parts: int) -> int:
    """splitmix64 over `parts`, folded to 63 bits so any torch.Generator accepts it."""
    h = 0
    for part in parts:
        h = ((h ^ (part & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def moment_shape(shape: torch.Size | tuple[int, ...], rank: int) -> tuple[int, ...]:
    """APOLLO moments project the smaller dimension of each matrix down to `rank`."""
    *batch, m, n = shape
    return (*batch, rank, n) if m <= n else (*batch, m, rank)


def _norm_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one figure per matrix: 0-d for a 2-D weight, (E, 1, 1) for experts."""
    return () if len(shape) == 2 else (*shape[:-2], 1, 1)


def _matrix_norm(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Frobenius norm of each matrix (the last two dims), in _norm_shape."""
    if t.dim() == 2:
        return torch.linalg.vector_norm(t, dtype=dtype)
    return torch.linalg.vector_norm(t, dim=(-2, -1), keepdim=True, dtype=dtype)


def _effective_lr(settings: OptimizerSettings, step: int) -> float:
    """Linear warmup over the optimizer's global step count."""
    if settings.warmup_steps > 0:
        return settings.lr * min(1.0, step / settings.warmup_steps)
    return settings.lr


def _absmax(t: torch.Tensor) -> torch.Tensor:
    """max |t| as fp32, without an |t|-sized temporary; NaN if t has a NaN."""
    low, high = torch.aminmax(t)
    return torch.maximum(-low, high).float()


def _all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """0-d bool on the tensors' device, so callers can batch the host sync."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def _limiter(norm: torch.Tensor, prev: torch.Tensor, gamma: float) -> torch.Tensor:
    """Factor that caps ||U|| at gamma * prev; a zero prev (no history) means no cap."""
    limit = prev * gamma
    capped = (prev > 0) & (norm > limit)
    return torch.where(capped, limit / norm, torch.ones_like(norm))


def _project(
    g: torch.Tensor, name: str, rank: int, settings: OptimizerSettings, t: int
) -> tuple[torch.Tensor, int]:
    """R = P G if m <= n else G P^T (per matrix of a batch), and the axis P contracts
    (channels run along the other)."""
    m, n = g.shape[-2:]
    refresh = (t - 1) // settings.proj_refresh
    p = projection(name, (m, n), rank, settings.seed, refresh, g.device)
    return (p @ g, -2) if m <= n else (g @ p.T, -1)


def _adam(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    x: torch.Tensor,
    settings: OptimizerSettings,
    t: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bias-corrected Adam step t on x: new moments and m_hat / (sqrt(v_hat) + eps).

    Returns new tensors: the old moments are committed state and must stay unchanged.
    """
    b1, b2 = settings.betas
    new_avg = exp_avg.mul(b1).add_(x, alpha=1 - b1)
    new_sq = exp_avg_sq.mul(b2).addcmul_(x, x, value=1 - b2)
    denom = (new_sq / (1 - b2**t)).sqrt_().add_(settings.eps)
    return new_avg, new_sq, (new_avg / (1 - b1**t)).div_(denom)


def _channel_scale(
    adam: torch.Tensor, projected: torch.Tensor, dim: int, rank: int
) -> torch.Tensor:
    """APOLLO's s = ||R~|| / ||R|| per channel (norms over `dim`), tensor-wise at rank 1.

    At rank 1 a channel has a single entry and its ratio is just Adam's per-element
    normalisation, too noisy to use; APOLLO-Mini therefore shares one scale.
    """
    if rank == 1:
        return _matrix_norm(adam) / (_matrix_norm(projected) + _NORM_EPS)
    adam_norm = torch.linalg.vector_norm(adam, dim=dim, keepdim=True)
    return adam_norm / (torch.linalg.vector_norm(projected, dim=dim, keepdim=True) + _NORM_EPS)


def _fits(bound: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """True when a bound on |W_new| stays within `dtype`; False for NaN/inf bounds too."""
    return bound <= torch.finfo(dtype).max


def _write(weight: torch.Tensor, direction: torch.Tensor, coef: torch.Tensor, decay: float) -> None:
    """W <- W * decay - direction * coef, computed in fp32 and stored in W's dtype.

    fp32 weights update in place. Others go through fp32 blocks of at most a quarter of
    the weight (and _BLOCK_ELEMENTS elements) along its longest dimension, so the two
    block temporaries (fp32 copies of the weight and the direction) together take no
    more memory than the 16-bit weight itself.
    """
    if weight.numel() == 0:
        return
    if weight.dtype == torch.float32:
        _decay_and_subtract(weight, direction, coef, decay)
        return
    if weight.dim() == 0:
        weight, direction = weight.unsqueeze(0), direction.unsqueeze(0)
    coef = coef.expand_as(weight)  # a stride-0 view, so blocks can slice it
    dim = max(range(weight.dim()), key=lambda d: weight.shape[d])
    size = weight.shape[dim]
    block = max(1, min(size // 4, _BLOCK_ELEMENTS // (weight.numel() // size)))
    for start in range(0, size, block):
        length = min(block, size - start)
        part = weight.narrow(dim, start, length)
        part32 = part.float()
        step = direction.narrow(dim, start, length).float()
        _decay_and_subtract(part32, step, coef.narrow(dim, start, length), decay)
        part.copy_(part32)


def _write_weight(
    weight: Weight, direction: torch.Tensor, coef: torch.Tensor, decay: float
) -> None:
    """`_write` into a weight, part by part (and then every rank's copy) when it is split
    across tensor-parallel ranks."""
    if not isinstance(weight, Shards):
        _write(weight, direction, coef, decay)
        return
    for part, d, c in zip(weight.parts, weight.split(direction), weight.split(coef), strict=True):
        _write(part.detach(), d, c, decay)
    weight.spread()


def _weight_absmax(param: Weight) -> torch.Tensor:
    """max |W| as fp32; of a tensor split across ranks, the largest of its parts'."""
    if isinstance(param, Shards):
        return torch.stack([_absmax(part.detach()) for part in param.parts]).amax()
    return _absmax(param)


def _decay_and_subtract(
    target: torch.Tensor, direction: torch.Tensor, coef: torch.Tensor, decay: float
) -> None:
    if decay != 1.0:  # skipping a multiply by exactly 1 saves a pass and changes no bit
        target.mul_(decay)
    target.addcmul_(direction, coef, value=-1.0)


def _movement(
    param: Weight, step_norm: torch.Tensor, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a bound on ||delta W||, ||W||) for W <- W * decay - step, in fp32 on W's device;
    per matrix for APOLLO's batches of matrices (`step_norm` has their shape)."""
    if isinstance(param, Shards):
        weight_norm = param.norm()  # tensor_parallel.gather refuses batches of matrices
    elif step_norm.dim() > 0:
        weight_norm = _matrix_norm(param, torch.float32)
    else:
        weight_norm = torch.linalg.vector_norm(param, dtype=torch.float32)
    return step_norm + (1.0 - decay) * weight_norm, weight_norm


def _refuse_large_moves(moves: list[tuple[str, torch.Tensor, torch.Tensor]], limit: float) -> None:
    """Raise DestructiveUpdate for the first tensor (or expert matrix, `name[k]`) the
    step would move by more than `limit` of its norm (all-zero ones have no scale to
    compare with). One host sync for all of them."""
    if not moves:
        return
    moved = torch.cat([m.to("cpu").reshape(-1) for _, m, _ in moves]).tolist()
    norms = torch.cat([w.to("cpu").reshape(-1) for _, _, w in moves]).tolist()
    labels = [
        name if m.numel() == 1 else f"{name}[{k}]" for name, m, _ in moves for k in range(m.numel())
    ]
    for name, delta, norm in zip(labels, moved, norms, strict=True):
        if norm > 0 and delta > limit * norm:
            raise DestructiveUpdate(
                name,
                f"the step would move it by {delta / norm:.3g} of its norm, over the limit of "
                f"{limit:g} (lower lr, or raise LIVETRAIN_MAX_UPDATE_RATIO)",
            )


def _raise_first_failure(checks: list[tuple[str, str, torch.Tensor]]) -> None:
    """Raise NonFiniteUpdate for the first failed (name, reason, ok) check.

    The flags are read with one host sync per device rather than one per check.
    """
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, _, ok) in enumerate(checks):
        by_device.setdefault(ok.device, []).append(i)
    passed: dict[int, bool] = {}
    for indices in by_device.values():
        values = torch.stack([checks[i][2] for i in indices]).tolist()
        passed.update(zip(indices, values, strict=True))
    for i, (name, reason, _) in enumerate(checks):
        if not passed[i]:
            raise NonFiniteUpdate(name, reason)


class Apollo:
    """APOLLO for `apollo_params` (matrices, or batches of them) and AdamW for
    `adamw_params`."""

    def __init__(
        self,
        apollo_params: Mapping[str, Weight],
        adamw_params: Mapping[str, Weight],
    ) -> None:
        both = sorted(set(apollo_params) & set(adamw_params))
        if both:
            raise ValueError(f"parameters given to both APOLLO and AdamW: {both}")
        for name, param in apollo_params.items():
            if param.ndim < 2:
                raise ValueError(f"{name}: APOLLO needs a matrix, got {tuple(param.shape)}")
        self._apollo_params = dict(apollo_params)
        self._adamw_params = dict(adamw_params)
        self._apollo_state: dict[str, ApolloTensorState] = {}
        self._adamw_state: dict[str, AdamWTensorState] = {}
        self._steps = 0

    @property
    def steps(self) -> int:
        """Steps applied so far (prepared-but-unapplied steps do not count)."""
        return self._steps

    def step(self, settings: OptimizerSettings) -> PendingStep:
        """prepare() then apply(), for callers that need no fence between them."""
        pending = self.prepare(settings)
        self.apply(pending)
        return pending

    @torch.no_grad()
    def prepare(
        self, settings: OptimizerSettings, max_update_ratio: float = math.inf
    ) -> PendingStep:
        """Compute and check the next step from the current .grad, modifying nothing.

        Raises ValueError if a parameter has no gradient, NonFiniteUpdate if any
        gradient, moment, scale, update norm or resulting weight would not be finite,
        and DestructiveUpdate if the decay factor 1 - lr * weight_decay is not in (0, 1]
        or the step would move a tensor by more than `max_update_ratio` of its norm
        (||delta W|| / ||W||, bounded by the triangle inequality: the gradient step's
        norm, which APOLLO's limiter computes anyway, plus the decay's). The gradients
        must not change in place before the matching apply().
        """
        assert settings.rank >= 1, "settings.rank must be >= 1"
        self._require_grads()
        step, lr, decay = self._schedule(settings)
        checks: list[tuple[str, str, torch.Tensor]] = []
        moves: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # name, ||delta||, ||W||
        guarded = math.isfinite(max_update_ratio)
        apollo: dict[str, ApolloTensorStep] = {}
        adamw: dict[str, AdamWTensorStep] = {}
        for name in {**self._apollo_params, **self._adamw_params}:
            result, tensor_checks, move = self._prepare_tensor(name, settings, lr, decay, guarded)
            if isinstance(result, ApolloTensorStep):
                apollo[name] = result
            else:
                adamw[name] = result
            checks += tensor_checks
            moves += move
        _raise_first_failure(checks)
        if guarded:
            _refuse_large_moves(moves, max_update_ratio)
        reset = [name for name, result in apollo.items() if self._rank_changed(name, result)]
        return PendingStep(step, lr, decay, apollo, adamw, reset)

    def _schedule(self, settings: OptimizerSettings) -> tuple[int, float, float]:
        """(the step's number, its lr after warmup, its decay factor), or a
        DestructiveUpdate when the decay factor is not in (0, 1]."""
        step = self._steps + 1
        lr = _effective_lr(settings, step)
        decay = 1.0 - lr * settings.weight_decay
        if not 0.0 < decay <= 1.0:
            raise DestructiveUpdate(
                "weight_decay", f"decay factor 1 - lr * weight_decay = {decay:g} is not in (0, 1]"
            )
        return step, lr, decay

    def _prepare_tensor(
        self, name: str, settings: OptimizerSettings, lr: float, decay: float, guarded: bool
    ) -> tuple[
        ApolloTensorStep | AdamWTensorStep,
        list[tuple[str, str, torch.Tensor]],
        list[tuple[str, torch.Tensor, torch.Tensor]],
    ]:
        """One tensor's step, its checks, and (`guarded`) how far it would move it."""
        param = self._param(name)
        prepare = self._prepare_apollo if name in self._apollo_params else self._prepare_adamw
        result, tensor_checks, step_norm = prepare(name, param, settings, lr, decay)
        checks = [(name, reason, ok) for reason, ok in tensor_checks]
        # one weight-norm reduction per tensor, only when it is checked
        moves = [(name, *_movement(param, step_norm, decay))] if guarded else []
        return result, checks, moves

    def _rank_changed(self, name: str, result: ApolloTensorStep) -> bool:
        old = self._apollo_state.get(name)
        return old is not None and old.rank != result.state.rank

    @torch.no_grad()
    def step_tensor(
        self, name: str, settings: OptimizerSettings, max_update_ratio: float = math.inf
    ) -> bool:
        """The per-layer step: take the next step (the one `prepare` would compute) for
        tensor `name` alone, as soon as its gradient exists, and write it at once; the
        other tensors are untouched until their turn, and `end_step` then counts the
        step. A tensor whose update fails a check raises RefusedUpdate with nothing of
        it written. Returns whether its moments restarted for a new rank."""
        param = self._param(name)
        if param.grad is None:
            raise ValueError(f"{name}: no gradient")
        _, lr, decay = self._schedule(settings)
        guarded = math.isfinite(max_update_ratio)
        result, checks, moves = self._prepare_tensor(name, settings, lr, decay, guarded)
        _raise_first_failure(checks)
        if guarded:
            _refuse_large_moves(moves, max_update_ratio)
        direction = result.grad if isinstance(result, ApolloTensorStep) else result.update
        _write_weight(param, direction, result.coef, decay)
        if isinstance(result, ApolloTensorStep):
            reset = self._rank_changed(name, result)
            self._apollo_state[name] = result.state
            return reset
        self._adamw_state[name] = result.state
        return False

    def end_step(self) -> None:
        """Count a per-layer step whose tensors `step_tensor` has written."""
        self._steps += 1

    @torch.no_grad()
    def apply(self, pending: PendingStep) -> None:
        """Write every weight in place, then commit the optimizer state prepared with it."""
        if pending.step != self._steps + 1:
            raise ValueError(
                f"stale PendingStep: prepared for step {pending.step}, "
                f"but {self._steps} steps have been applied"
            )
        if pending.values is not None:
            for name, value in pending.values.items():
                self._param(name).copy_(value)
        else:
            for name, step in self._directions(pending):
                _write_weight(self._param(name), *step, pending.decay)
        self._apollo_state.update({name: r.state for name, r in pending.apollo.items()})
        self._adamw_state.update({name: r.state for name, r in pending.adamw.items()})
        self._steps = pending.step

    @torch.no_grad()
    def preview(self, pending: PendingStep) -> PendingStep:
        """`pending` with the weights it would write, computed into new tensors by the
        same arithmetic apply() runs in place (bit for bit what apply() would write),
        so the step can be judged first; apply() of the result is a copy. Costs one
        copy of the trained tensors while it is held."""
        values = {}
        for name, step in self._directions(pending):
            values[name] = copy_of(self._param(name))
            _write(values[name], *step, pending.decay)
        return dataclasses.replace(pending, values=values)

    @staticmethod
    def _directions(
        pending: PendingStep,
    ) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
        """(name, (direction, coef)) of every tensor the step writes."""
        out = [(name, (r.grad, r.coef)) for name, r in pending.apollo.items()]
        return out + [(name, (r.update, r.coef)) for name, r in pending.adamw.items()]

    def _param(self, name: str) -> Weight:
        params = self._apollo_params if name in self._apollo_params else self._adamw_params
        return params[name]

    def _require_grads(self) -> None:
        for name, param in {**self._apollo_params, **self._adamw_params}.items():
            if param.grad is None:
                raise ValueError(f"{name}: no gradient (every parameter given must have one)")

    def _prepare_apollo(
        self,
        name: str,
        param: Weight,
        settings: OptimizerSettings,
        lr: float,
        decay: float,
    ) -> tuple[ApolloTensorStep, list[tuple[str, torch.Tensor]], torch.Tensor]:
        grad = param.grad
        assert grad is not None  # _require_grads ran first
        g = grad.float()
        rank = min(settings.rank, *g.shape[-2:])
        base = self._apollo_base(name, g, rank)
        t = base.steps + 1
        projected, dim = _project(g, name, rank, settings, t)
        new_avg, new_sq, adam = _adam(base.exp_avg, base.exp_avg_sq, projected, settings, t)
        scale = _channel_scale(adam, projected, dim, rank)
        # ||G * s||_F from per-channel norms of G: U itself is never materialised.
        g_norms = torch.linalg.vector_norm(g, dim=dim, keepdim=True)
        norm = _matrix_norm(scale * g_norms) * math.sqrt(settings.scale)
        limiter = _limiter(norm, base.prev_update_norm, settings.norm_growth_limit)
        coef = scale * (lr * math.sqrt(settings.scale)) * limiter
        # max_j(max|G_j| * coef_j) is never looser than max|G| * max(coef) and still bounds
        # the step, so it rejects fewer safe updates when the scales vary a lot by channel.
        g_low, g_high = torch.aminmax(g, dim=dim, keepdim=True)
        bound = _weight_absmax(param) * abs(decay) + (torch.maximum(-g_low, g_high) * coef).amax()
        checks = [
            ("non-finite gradient", _all_finite(g_low, g_high)),
            ("non-finite moments", _all_finite(new_avg, new_sq)),
            ("non-finite scale factors", _all_finite(scale)),
            ("non-finite update norm", _all_finite(norm)),
            (f"updated weight would not be finite in {param.dtype}", _fits(bound, param.dtype)),
        ]
        state = ApolloTensorState(new_avg, new_sq, t, rank, norm * limiter)
        return ApolloTensorStep(state, grad, scale, limiter, coef), checks, norm * limiter * lr

    def _apollo_base(self, name: str, g: torch.Tensor, rank: int) -> ApolloTensorState:
        """The state this step builds on; zero moments at steps=0 if new or re-ranked.

        A rank change restarts the moments (and with them the bias correction) but
        keeps the limiter's history: the new rank's first step is the kind of jump the
        limiter exists to damp.
        """
        old = self._apollo_state.get(name)
        if old is not None and old.rank == rank:
            return old
        zeros = torch.zeros(moment_shape(g.shape, rank), device=g.device)
        prev = torch.zeros(_norm_shape(g.shape), device=g.device)
        prev = prev if old is None else old.prev_update_norm
        return ApolloTensorState(zeros, zeros, 0, rank, prev)

    def _prepare_adamw(
        self,
        name: str,
        param: Weight,
        settings: OptimizerSettings,
        lr: float,
        decay: float,
    ) -> tuple[AdamWTensorStep, list[tuple[str, torch.Tensor]], torch.Tensor]:
        assert param.grad is not None  # _require_grads ran first
        g = param.grad.float()
        base = self._adamw_state.get(name)
        if base is None:
            zeros = torch.zeros_like(g)
            base = AdamWTensorState(zeros, zeros, 0)
        t = base.steps + 1
        new_avg, new_sq, update = _adam(base.exp_avg, base.exp_avg_sq, g, settings, t)
        coef = torch.full((), lr, dtype=torch.float32, device=g.device)
        update_max = _absmax(update)
        bound = _weight_absmax(param) * abs(decay) + update_max * coef
        checks = [
            ("non-finite gradient", _all_finite(_absmax(g))),
            ("non-finite moments", _all_finite(new_avg, new_sq)),
            ("non-finite update", _all_finite(update_max)),
            (f"updated weight would not be finite in {param.dtype}", _fits(bound, param.dtype)),
        ]
        step = AdamWTensorStep(AdamWTensorState(new_avg, new_sq, t), update, coef)
        return step, checks, torch.linalg.vector_norm(update) * lr

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat, tensors-only snapshot (moments on their parameter's device, counters on CPU).

        The tensors are the optimizer's own, but apply() replaces state rather than
        mutating it, so the snapshot stays valid after later steps.
        """
        out = {"steps": torch.tensor(self._steps, dtype=torch.int64)}
        for name, s in self._apollo_state.items():
            out[f"apollo/{name}/exp_avg"] = s.exp_avg
            out[f"apollo/{name}/exp_avg_sq"] = s.exp_avg_sq
            out[f"apollo/{name}/steps"] = torch.tensor(s.steps, dtype=torch.int64)
            out[f"apollo/{name}/prev_update_norm"] = s.prev_update_norm
            out[f"apollo/{name}/rank"] = torch.tensor(s.rank, dtype=torch.int64)
        for name, a in self._adamw_state.items():
            out[f"adamw/{name}/exp_avg"] = a.exp_avg
            out[f"adamw/{name}/exp_avg_sq"] = a.exp_avg_sq
            out[f"adamw/{name}/steps"] = torch.tensor(a.steps, dtype=torch.int64)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace all state with `state`, after validating every key, shape and rank.

        Raises ValueError naming the key on any mismatch, leaving the current state as
        it was. Tensors are copied to fp32 on their parameter's device. Parameters
        without entries (never stepped) start fresh.
        """
        groups = _group_keys(state)
        steps = _read_int(state, "steps", minimum=0)
        apollo: dict[str, ApolloTensorState] = {}
        adamw: dict[str, AdamWTensorState] = {}
        for (kind, name), fields in groups.items():
            if kind == "apollo":
                apollo[name] = self._load_apollo(name, fields)
            else:
                adamw[name] = self._load_adamw(name, fields)
        self._apollo_state, self._adamw_state, self._steps = apollo, adamw, steps

    def _load_apollo(self, name: str, fields: Mapping[str, torch.Tensor]) -> ApolloTensorState:
        prefix = f"apollo/{name}/"
        param = self._group_param(prefix, self._apollo_params, name, fields, _APOLLO_FIELDS)
        rank = _read_int(fields, "rank", minimum=1, key=prefix + "rank")
        if rank > min(param.shape[-2:]):
            raise ValueError(f"{prefix}rank: {rank} exceeds min{tuple(param.shape[-2:])}")
        moments = moment_shape(param.shape, rank)
        _check_float_tensor(prefix + "exp_avg", fields["exp_avg"], moments)
        _check_float_tensor(prefix + "exp_avg_sq", fields["exp_avg_sq"], moments)
        norm_shape = _norm_shape(param.shape)
        _check_float_tensor(prefix + "prev_update_norm", fields["prev_update_norm"], norm_shape)
        return ApolloTensorState(
            exp_avg=_to_fp32(fields["exp_avg"], param),
            exp_avg_sq=_to_fp32(fields["exp_avg_sq"], param),
            steps=_read_int(fields, "steps", minimum=1, key=prefix + "steps"),
            rank=rank,
            prev_update_norm=_to_fp32(fields["prev_update_norm"], param),
        )

    def _load_adamw(self, name: str, fields: Mapping[str, torch.Tensor]) -> AdamWTensorState:
        prefix = f"adamw/{name}/"
        param = self._group_param(prefix, self._adamw_params, name, fields, _ADAMW_FIELDS)
        _check_float_tensor(prefix + "exp_avg", fields["exp_avg"], tuple(param.shape))
        _check_float_tensor(prefix + "exp_avg_sq", fields["exp_avg_sq"], tuple(param.shape))
        return AdamWTensorState(
            exp_avg=_to_fp32(fields["exp_avg"], param),
            exp_avg_sq=_to_fp32(fields["exp_avg_sq"], param),
            steps=_read_int(fields, "steps", minimum=1, key=prefix + "steps"),
        )

    @staticmethod
    def _group_param(
        prefix: str,
        params: Mapping[str, Weight],
        name: str,
        fields: Mapping[str, torch.Tensor],
        expected: tuple[str, ...],
    ) -> Weight:
        """The parameter a key group belongs to, once the group is known to be complete."""
        if name not in params:
            raise ValueError(f"{prefix}: no such parameter in this optimizer")
        unknown = sorted(set(fields) - set(expected))
        if unknown:
            raise ValueError(f"{prefix}{unknown[0]}: unknown state field")
        missing = sorted(set(expected) - set(fields))
        if missing:
            raise ValueError(f"{prefix}{missing[0]}: missing")
        return params[name]

    def state_bytes(self) -> int:
        """Bytes held by all optimizer state tensors (what state_dict() would save)."""
        return sum(t.nbytes for t in self.state_dict().values())


def _group_keys(
    state: Mapping[str, torch.Tensor],
) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Split "<kind>/<name>/<field>" keys into per-tensor groups; names may contain '/'."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "steps":
            continue
        kind, _, rest = key.partition("/")
        name, _, field = rest.rpartition("/")
        if kind not in ("apollo", "adamw") or not name:
            raise ValueError(f"{key}: unknown state key")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key}: expected a tensor, got {type(value).__name__}")
        groups.setdefault((kind, name), {})[field] = value
    return groups


def _check_float_tensor(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {shape}")
    if not tensor.is_floating_point():
        raise ValueError(f"{key}: dtype {tensor.dtype}, expected a floating point tensor")


def _read_int(
    tensors: Mapping[str, torch.Tensor], field: str, minimum: int, key: str | None = None
) -> int:
    """A 0-d integer counter, checked against `minimum`."""
    key = key or field
    if field not in tensors:
        raise ValueError(f"{key}: missing")
    tensor = tensors[field]
    if not isinstance(tensor, torch.Tensor) or tensor.shape != () or tensor.is_floating_point():
        raise ValueError(f"{key}: expected a 0-d integer tensor")
    value = int(tensor.item())
    if value < minimum:
        raise ValueError(f"{key}: {value} is below {minimum}")
    return value


def _to_fp32(tensor: torch.Tensor, param: Weight) -> torch.Tensor:
    """A private fp32 copy on the parameter's device, so the caller's dict is not aliased."""
    return tensor.to(device=param.device, dtype=torch.float32, copy=True)
