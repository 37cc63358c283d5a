"""livetrain.trainer.apollo against an independent float64 reference written from the formulas.

The reference takes the projection matrix P explicitly; P comes from the public
`projection()` helper, which is tested on its own (shape, variance, determinism).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch

from livetrain.config import OptimizerSettings
from livetrain.trainer.apollo import Apollo, NonFiniteUpdate, projection

Params = dict[str, torch.nn.Parameter]


def make_settings(**overrides: object) -> OptimizerSettings:
    return dataclasses.replace(OptimizerSettings(), **overrides)


def ref_lr(settings: OptimizerSettings, step: int) -> float:
    if settings.warmup_steps > 0:
        return settings.lr * min(1.0, step / settings.warmup_steps)
    return settings.lr


def new_ref_state() -> dict:
    return {"m": None, "v": None, "t": 0, "prev": None}


def ref_apollo_step(
    w: torch.Tensor,
    g: torch.Tensor,
    p: torch.Tensor,
    state: dict,
    settings: OptimizerSettings,
    lr: float,
) -> torch.Tensor:
    """One APOLLO step in float64, straight from the algorithm; updates `state`."""
    w, g, p = w.double(), g.double(), p.double()
    rows, cols = g.shape
    r = p.shape[0]
    proj = p @ g if rows <= cols else g @ p.T
    b1, b2 = settings.betas
    state["t"] += 1
    t = state["t"]
    m = torch.zeros_like(proj) if state["m"] is None else state["m"]
    v = torch.zeros_like(proj) if state["v"] is None else state["v"]
    state["m"] = b1 * m + (1 - b1) * proj
    state["v"] = b2 * v + (1 - b2) * proj**2
    adam = (state["m"] / (1 - b1**t)) / ((state["v"] / (1 - b2**t)).sqrt() + settings.eps)

    update = g.clone()
    if r == 1:
        update *= adam.norm() / (proj.norm() + 1e-8)
    elif rows <= cols:
        for j in range(cols):
            update[:, j] *= adam[:, j].norm() / (proj[:, j].norm() + 1e-8)
    else:
        for i in range(rows):
            update[i, :] *= adam[i, :].norm() / (proj[i, :].norm() + 1e-8)
    update *= math.sqrt(settings.scale)

    norm = update.norm().item()
    if state["prev"] and norm > settings.norm_growth_limit * state["prev"]:
        update *= settings.norm_growth_limit * state["prev"] / norm
    state["prev"] = update.norm().item()
    return w * (1 - lr * settings.weight_decay) - lr * update


def ref_projection(name: str, shape: tuple[int, int], settings: OptimizerSettings, t: int):
    return projection(
        name, shape, settings.rank, settings.seed, (t - 1) // settings.proj_refresh, "cpu"
    )


def make_params(shapes: dict[str, tuple[int, ...]], dtype=torch.float32, seed: int = 0) -> Params:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
        for name, shape in shapes.items()
    }


def set_grads(params: Params, gen: torch.Generator, factor: float = 1.0) -> None:
    for p in params.values():
        p.grad = (torch.randn(p.shape, generator=gen) * factor).to(p.dtype)


def snapshot(params: Params, opt: Apollo) -> tuple[dict, dict]:
    weights = {n: p.detach().clone() for n, p in params.items()}
    return weights, {k: v.clone() for k, v in opt.state_dict().items()}


def assert_unchanged(params: Params, opt: Apollo, before: tuple[dict, dict]) -> None:
    weights, state = before
    for name, p in params.items():
        assert torch.equal(p.detach(), weights[name]), name
    after = opt.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key


SHAPES = {"wide": (4, 12), "tall": (12, 4), "square": (6, 6), "thin": (2, 9)}


# --- projection ---------------------------------------------------------------------


def test_projection_shape_is_rank_by_smaller_dim_and_rank_is_clamped() -> None:
    assert projection("a", (4, 12), 3, 0, 0, "cpu").shape == (3, 4)
    assert projection("a", (12, 4), 3, 0, 0, "cpu").shape == (3, 4)
    assert projection("a", (4, 12), 10, 0, 0, "cpu").shape == (4, 4)
    assert projection("a", (4, 12), 3, 0, 0, "cpu").dtype == torch.float32


def test_projection_entries_have_variance_one_over_rank() -> None:
    rank = 16
    p = projection("big", (512, 4096), rank, 0, 0, "cpu")
    assert p.shape == (rank, 512)
    assert p.var().item() == pytest.approx(1 / rank, rel=0.05)
    assert abs(p.mean().item()) < 4 * math.sqrt(1 / rank / p.numel())


def test_projection_is_deterministic_and_changes_with_each_input() -> None:
    base = projection("layer.0.w", (8, 32), 4, 7, 3, "cpu")
    assert torch.equal(base, projection("layer.0.w", (8, 32), 4, 7, 3, "cpu"))
    for other in (
        projection("layer.0.w", (8, 32), 4, 7, 4, "cpu"),  # next refresh
        projection("layer.1.w", (8, 32), 4, 7, 3, "cpu"),  # other tensor
        projection("layer.0.w", (8, 32), 4, 8, 3, "cpu"),  # other seed
    ):
        assert not torch.allclose(base, other)


# --- APOLLO against the reference ---------------------------------------------------


def run_against_reference(
    settings: OptimizerSettings,
    shapes: dict[str, tuple[int, int]],
    steps: int,
    grad_factor: Callable[[int], float] = lambda step: 1.0,
) -> tuple[Params, Apollo, dict]:
    params = make_params(shapes)
    opt = Apollo(params, {})
    ref_w = {n: p.detach().double() for n, p in params.items()}
    ref_state = {n: new_ref_state() for n in params}
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        set_grads(params, gen, grad_factor(step))
        pending = opt.step(settings)
        assert pending.lr == pytest.approx(ref_lr(settings, step))
        for name, p in params.items():
            proj = ref_projection(name, tuple(p.shape), settings, step)
            ref_w[name] = ref_apollo_step(
                ref_w[name], p.grad, proj, ref_state[name], settings, ref_lr(settings, step)
            )
        assert_matches_reference(params, opt, ref_w, ref_state)
    return params, opt, ref_state


def assert_matches_reference(params: Params, opt: Apollo, ref_w: dict, ref_state: dict) -> None:
    state = opt.state_dict()
    for name, p in params.items():
        torch.testing.assert_close(p.detach().double(), ref_w[name], atol=1e-6, rtol=0)
        for key, ref_key in (("exp_avg", "m"), ("exp_avg_sq", "v")):
            moment = state[f"apollo/{name}/{key}"]
            assert moment.dtype == torch.float32
            torch.testing.assert_close(
                moment.double(), ref_state[name][ref_key], atol=1e-6, rtol=1e-5
            )
        assert int(state[f"apollo/{name}/steps"]) == ref_state[name]["t"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"rank": 3, "proj_refresh": 2, "lr": 1e-2},
        {"rank": 3, "proj_refresh": 2, "lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 3},
        {"rank": 2, "proj_refresh": 3, "lr": 3e-2, "scale": 4.0, "betas": (0.8, 0.95), "seed": 5},
    ],
)
def test_apollo_matches_reference_across_refreshes(overrides: dict) -> None:
    settings = make_settings(**overrides)
    start = make_params(SHAPES)
    params, opt, _ = run_against_reference(settings, SHAPES, steps=5, grad_factor=lambda s: s)
    assert opt.steps == 5
    for name, p in params.items():  # guard against a vacuous comparison
        assert (p.detach() - start[name].detach()).abs().max() > 1e-2


def test_reference_tracks_the_projection_refresh() -> None:
    """Steps 1-2 share P and step 3 uses a new one: a stale P would not match."""
    settings = make_settings(rank=3, proj_refresh=2)
    p1, p3 = (
        ref_projection("wide", (4, 12), settings, 1),
        ref_projection("wide", (4, 12), settings, 3),
    )
    assert torch.equal(p1, ref_projection("wide", (4, 12), settings, 2))
    assert not torch.allclose(p1, p3)


def test_rank_one_uses_one_tensor_wise_scale() -> None:
    settings = make_settings(rank=1, lr=1e-2)
    run_against_reference(settings, SHAPES, steps=3)

    for shape in ((4, 12), (12, 4)):
        params = {"w": torch.nn.Parameter(torch.zeros(shape))}
        params["w"].grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        pending = Apollo(params, {}).step(settings)
        assert pending.apollo["w"].scale.dim() == 0
        ratio = -params["w"].detach() / params["w"].grad
        torch.testing.assert_close(
            ratio, torch.full_like(ratio, ratio[0, 0].item()), rtol=1e-6, atol=0
        )


def test_rank_above_one_scales_each_channel() -> None:
    """The contrast to rank 1: per-column (m <= n) or per-row (m > n) factors."""
    for shape, scale_shape in (((4, 12), (1, 12)), ((12, 4), (12, 1))):
        params = {"w": torch.nn.Parameter(torch.zeros(shape))}
        params["w"].grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        pending = Apollo(params, {}).step(make_settings(rank=2))
        assert pending.apollo["w"].scale.shape == scale_shape
        ratio = -params["w"].detach() / params["w"].grad
        assert ratio.std() > 1e-3 * ratio.abs().mean()


# --- norm-growth limiter ------------------------------------------------------------

# betas 0 and a huge eps make U proportional to G, so a 10x gradient is a 10x update.
LIMITER = {"lr": 1.0, "rank": 2, "betas": (0.0, 0.0), "eps": 1e3}


def limiter_run(first: torch.Tensor, second: torch.Tensor) -> tuple[list, list, torch.Tensor]:
    settings = make_settings(**LIMITER)
    params = {"w": torch.nn.Parameter(torch.zeros(first.shape))}
    opt = Apollo(params, {})
    ref_w, ref_state = params["w"].detach().double(), new_ref_state()
    pendings, weights = [], [params["w"].detach().clone()]
    for step, grad in enumerate((first, second), start=1):
        params["w"].grad = grad
        pendings.append(opt.step(settings))
        weights.append(params["w"].detach().clone())
        proj = ref_projection("w", tuple(grad.shape), settings, step)
        ref_w = ref_apollo_step(ref_w, grad, proj, ref_state, settings, 1.0)
        torch.testing.assert_close(params["w"].detach().double(), ref_w, atol=1e-6, rtol=1e-6)
    return pendings, weights, ref_w


def test_limiter_caps_a_tenfold_growth_at_gamma() -> None:
    gamma = OptimizerSettings().norm_growth_limit
    grad = torch.randn(6, 10, generator=torch.Generator().manual_seed(3))
    pendings, weights, _ = limiter_run(grad, 10 * grad)
    first = (weights[1] - weights[0]).norm().item()
    second = (weights[2] - weights[1]).norm().item()
    assert second == pytest.approx(gamma * first, rel=1e-5)
    first_norm = pendings[0].apollo["w"].state.prev_update_norm.item()
    assert pendings[1].apollo["w"].state.prev_update_norm.item() == pytest.approx(
        gamma * first_norm, rel=1e-5
    )
    assert pendings[0].apollo["w"].limiter.item() == 1.0
    assert pendings[1].apollo["w"].limiter.item() < 0.2


def test_limiter_does_nothing_without_growth() -> None:
    grad = torch.randn(10, 6, generator=torch.Generator().manual_seed(4))
    pendings, weights, _ = limiter_run(grad, grad.clone())
    assert pendings[1].apollo["w"].limiter.item() == 1.0
    torch.testing.assert_close(weights[2] - weights[1], weights[1] - weights[0], rtol=1e-5, atol=0)


def test_zero_update_leaves_no_limit_behind() -> None:
    """A zero gradient gives prev = 0; that must not freeze the tensor afterwards."""
    grad = torch.randn(6, 10, generator=torch.Generator().manual_seed(5))
    pendings, weights, _ = limiter_run(torch.zeros_like(grad), grad)
    assert pendings[0].apollo["w"].state.prev_update_norm.item() == 0.0
    assert pendings[1].apollo["w"].limiter.item() == 1.0
    assert weights[2].abs().max() > 1e-4  # a frozen tensor (limit 1.01 * 0) stays at 0


# --- AdamW, warmup, weight decay ----------------------------------------------------


def test_adamw_tensors_match_torch_adamw_with_warmup_and_decay() -> None:
    settings = make_settings(lr=1e-2, weight_decay=0.1, warmup_steps=3, betas=(0.9, 0.99))
    params = make_params({"norm": (8,), "embed": (5, 3)})
    twins = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    opt = Apollo({}, params)
    torch_opt = torch.optim.AdamW(
        list(twins.values()),
        lr=settings.lr,
        betas=settings.betas,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
    )
    gen = torch.Generator().manual_seed(6)
    for step in range(1, 6):
        set_grads(params, gen, factor=step)
        for name, twin in twins.items():
            twin.grad = params[name].grad.clone()
        torch_opt.param_groups[0]["lr"] = settings.lr * min(1.0, step / 3)
        torch_opt.step()
        assert opt.step(settings).lr == pytest.approx(settings.lr * min(1.0, step / 3))
        state = opt.state_dict()
        for name, twin in twins.items():
            torch.testing.assert_close(params[name].detach(), twin.detach(), atol=1e-6, rtol=1e-6)
            for key in ("exp_avg", "exp_avg_sq"):
                expected = torch_opt.state[twin][key]
                torch.testing.assert_close(
                    state[f"adamw/{name}/{key}"], expected, atol=1e-7, rtol=1e-5
                )


def test_mixed_optimizer_counts_global_steps() -> None:
    apollo, adamw = make_params({"w": (4, 6)}), make_params({"b": (6,)}, seed=1)
    opt = Apollo(apollo, adamw)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        set_grads(apollo, gen)
        set_grads(adamw, gen)
        opt.step(make_settings())
    state = opt.state_dict()
    assert opt.steps == 3 and int(state["steps"]) == 3
    assert int(state["apollo/w/steps"]) == 3 and int(state["adamw/b/steps"]) == 3


def test_bfloat16_weights_are_updated_in_fp32_and_rounded_once() -> None:
    settings = make_settings(rank=3, lr=1e-2, weight_decay=0.1)
    params = make_params(SHAPES, dtype=torch.bfloat16)
    opt = Apollo(params, {})
    set_grads(params, torch.Generator().manual_seed(8))
    ref = {}
    for name, p in params.items():
        proj = ref_projection(name, tuple(p.shape), settings, 1)
        ref[name] = ref_apollo_step(
            p.detach(), p.grad, proj, new_ref_state(), settings, settings.lr
        )
    opt.step(settings)
    for name, p in params.items():
        assert p.dtype == torch.bfloat16
        # One rounding of the fp32 result: bf16 arithmetic (decay, then subtract) would
        # round twice and miss the correctly rounded reference.
        assert torch.equal(p.detach(), ref[name].to(torch.bfloat16)), name


# --- state dict ---------------------------------------------------------------------


def make_mixed(dtype: torch.dtype) -> tuple[Params, Params]:
    apollo = make_params({"attn.q": (6, 10), "mlp.down": (10, 6)}, dtype=dtype)
    return apollo, make_params({"norm": (10,)}, dtype=dtype, seed=1)


def test_state_round_trip_continues_bitwise(tmp_path) -> None:
    settings = make_settings(rank=3, proj_refresh=2, lr=1e-2, weight_decay=0.05)
    apollo, adamw = make_mixed(torch.bfloat16)
    opt = Apollo(apollo, adamw)
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        set_grads({**apollo, **adamw}, gen)
        opt.step(settings)

    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    for key in loaded:
        if key.endswith(("exp_avg", "exp_avg_sq", "prev_update_norm")):
            assert loaded[key].dtype == torch.float32, key
    apollo2 = {n: torch.nn.Parameter(p.detach().clone()) for n, p in apollo.items()}
    adamw2 = {n: torch.nn.Parameter(p.detach().clone()) for n, p in adamw.items()}
    resumed = Apollo(apollo2, adamw2)
    resumed.load_state_dict(loaded)
    assert resumed.steps == 2

    set_grads({**apollo, **adamw}, gen)
    for name, p in {**apollo2, **adamw2}.items():
        p.grad = {**apollo, **adamw}[name].grad.clone()
    opt.step(settings)
    resumed.step(settings)
    for name, p in {**apollo, **adamw}.items():
        assert torch.equal(p.detach(), {**apollo2, **adamw2}[name].detach()), name
    expected, actual = opt.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), key
        if value.is_floating_point():
            assert actual[key].dtype == torch.float32


def test_state_dict_is_flat_tensors_and_created_lazily() -> None:
    apollo, adamw = make_mixed(torch.float32)
    opt = Apollo(apollo, adamw)
    assert set(opt.state_dict()) == {"steps"}
    set_grads({**apollo, **adamw}, torch.Generator().manual_seed(10))
    opt.step(make_settings(rank=3))
    fields = ("exp_avg", "exp_avg_sq", "steps", "prev_update_norm", "rank")
    expected = {"steps"} | {f"apollo/{n}/{f}" for n in apollo for f in fields}
    expected |= {f"adamw/norm/{f}" for f in ("exp_avg", "exp_avg_sq", "steps")}
    state = opt.state_dict()
    assert set(state) == expected
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["apollo/attn.q/exp_avg"].shape == (3, 10)
    assert state["apollo/mlp.down/exp_avg"].shape == (10, 3)
    assert state["apollo/attn.q/rank"].dtype == torch.int64


def _shape_mismatch(state: dict) -> str:
    state["apollo/attn.q/exp_avg"] = torch.zeros(3, 11)
    return "apollo/attn.q/exp_avg"


def _unknown_param(state: dict) -> str:
    for field in ("exp_avg", "exp_avg_sq", "steps"):
        state[f"adamw/ghost/{field}"] = state[f"adamw/norm/{field}"]
    return "adamw/ghost/"


def _wrong_family(state: dict) -> str:
    for field in ("exp_avg", "exp_avg_sq", "steps"):
        state[f"adamw/attn.q/{field}"] = torch.zeros(6, 10) if "exp" in field else state["steps"]
    return "adamw/attn.q/"


def _unknown_field(state: dict) -> str:
    state["apollo/attn.q/momentum"] = torch.zeros(())
    return "apollo/attn.q/momentum"


def _unknown_top_level(state: dict) -> str:
    state["bogus"] = torch.zeros(())
    return "bogus"


def _missing_field(state: dict) -> str:
    del state["apollo/mlp.down/rank"]
    return "apollo/mlp.down/rank"


def _rank_too_large(state: dict) -> str:
    state["apollo/attn.q/rank"] = torch.tensor(7)
    return "apollo/attn.q/rank"


def _missing_steps(state: dict) -> str:
    del state["steps"]
    return "steps"


@pytest.mark.parametrize(
    "corrupt",
    [
        _shape_mismatch,
        _unknown_param,
        _wrong_family,
        _unknown_field,
        _unknown_top_level,
        _missing_field,
        _rank_too_large,
        _missing_steps,
    ],
)
def test_load_state_dict_rejects_and_keeps_state(corrupt: Callable[[dict], str]) -> None:
    apollo, adamw = make_mixed(torch.float32)
    opt = Apollo(apollo, adamw)
    set_grads({**apollo, **adamw}, torch.Generator().manual_seed(11))
    opt.step(make_settings(rank=3))
    before = snapshot({**apollo, **adamw}, opt)
    state = dict(opt.state_dict())
    key = corrupt(state)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        opt.load_state_dict(state)
    assert_unchanged({**apollo, **adamw}, opt, before)


# --- two-phase safety ---------------------------------------------------------------


def stepped_optimizer(dtype: torch.dtype = torch.float32) -> tuple[Params, Apollo]:
    apollo, adamw = make_mixed(dtype)
    opt = Apollo(apollo, adamw)
    params = {**apollo, **adamw}
    set_grads(params, torch.Generator().manual_seed(12))
    opt.step(make_settings(rank=3))
    set_grads(params, torch.Generator().manual_seed(13))
    return params, opt


def test_prepare_modifies_nothing_and_apply_commits() -> None:
    params, opt = stepped_optimizer()
    before = snapshot(params, opt)
    bytes_before = opt.state_bytes()
    pending = opt.prepare(make_settings(rank=3))
    assert_unchanged(params, opt, before)
    assert opt.state_bytes() == bytes_before and opt.steps == 1

    opt.apply(pending)
    assert opt.steps == 2
    for name, p in params.items():
        assert not torch.equal(p.detach(), before[0][name]), name
    assert torch.equal(
        opt.state_dict()["apollo/attn.q/exp_avg"], pending.apollo["attn.q"].state.exp_avg
    )


def test_first_prepare_creates_no_state() -> None:
    apollo, adamw = make_mixed(torch.float32)
    opt = Apollo(apollo, adamw)
    set_grads({**apollo, **adamw}, torch.Generator().manual_seed(14))
    opt.prepare(make_settings())
    assert set(opt.state_dict()) == {"steps"} and opt.steps == 0


def test_stale_pending_step_is_refused() -> None:
    params, opt = stepped_optimizer()
    pending = opt.prepare(make_settings(rank=3))
    opt.apply(pending)
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match="stale"):
        opt.apply(pending)
    assert_unchanged(params, opt, before)


@pytest.mark.parametrize("name", ["attn.q", "mlp.down", "norm"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_is_refused_untouched(name: str, bad: float) -> None:
    params, opt = stepped_optimizer()
    params[name].grad[0, ...] = bad
    before = snapshot(params, opt)
    with pytest.raises(NonFiniteUpdate, match=name.replace(".", r"\.")) as info:
        opt.prepare(make_settings(rank=3))
    assert info.value.name == name
    assert_unchanged(params, opt, before)
    assert opt.steps == 1


def test_update_overflowing_fp32_is_refused_untouched() -> None:
    apollo, adamw = make_mixed(torch.float32)
    params, opt = {**apollo, **adamw}, Apollo(apollo, adamw)  # fresh: no limiter history
    set_grads(params, torch.Generator().manual_seed(17), factor=1e10)  # v = R^2 stays finite
    before = snapshot(params, opt)
    with pytest.raises(NonFiniteUpdate, match="float32") as info:
        opt.prepare(make_settings(rank=3, lr=1e38, scale=1e4))
    assert info.value.name == "attn.q"
    assert_unchanged(params, opt, before)


@pytest.mark.parametrize("trainable", ["apollo", "adamw"])
def test_update_overflowing_the_weight_dtype_is_refused(trainable: str) -> None:
    """lr 1e6 is fine in fp32 but not in float16 (max 65504): the bound uses W's dtype."""
    param = torch.nn.Parameter(torch.randn(4, 6).half())
    param.grad = torch.randn(4, 6).half()
    opt = Apollo({"w": param}, {}) if trainable == "apollo" else Apollo({}, {"w": param})
    before = snapshot({"w": param}, opt)
    with pytest.raises(NonFiniteUpdate, match="float16"):
        opt.prepare(make_settings(lr=1e6))
    assert_unchanged({"w": param}, opt, before)
    opt.prepare(make_settings(lr=1e-3))  # the same step at a sane lr passes


def test_missing_gradient_is_a_value_error_naming_the_tensor() -> None:
    params, opt = stepped_optimizer()
    params["norm"].grad = None
    with pytest.raises(ValueError, match="norm") as info:
        opt.prepare(make_settings(rank=3))
    assert not isinstance(info.value, NonFiniteUpdate)


def test_rank_change_resets_and_reports_moments() -> None:
    params = make_params({"wide": (4, 12), "thin": (2, 9)})
    opt = Apollo(params, {})
    gen = torch.Generator().manual_seed(15)
    set_grads(params, gen)
    opt.step(make_settings(rank=4))  # wide: r = 4, thin: r = min(4, 2) = 2
    prev = opt.state_dict()["apollo/wide/prev_update_norm"].item()
    set_grads(params, gen)

    settings = make_settings(rank=3)  # thin stays at r = 2
    ref_w = params["wide"].detach().double()
    ref_state = {**new_ref_state(), "prev": prev}  # fresh moments, limiter history kept
    proj = ref_projection("wide", (4, 12), settings, 1)
    ref_w = ref_apollo_step(ref_w, params["wide"].grad, proj, ref_state, settings, settings.lr)

    pending = opt.step(settings)
    assert pending.moments_reset == ["wide"]
    state = opt.state_dict()
    assert int(state["apollo/wide/rank"]) == 3 and state["apollo/wide/exp_avg"].shape == (3, 12)
    assert int(state["apollo/wide/steps"]) == 1 and int(state["apollo/thin/steps"]) == 2
    torch.testing.assert_close(params["wide"].detach().double(), ref_w, atol=1e-6, rtol=0)
    set_grads(params, gen)
    assert opt.step(settings).moments_reset == []  # reported once, not on every step


def test_constructor_rejects_non_matrix_and_duplicate_names() -> None:
    with pytest.raises(ValueError, match="bias"):
        Apollo({"bias": torch.nn.Parameter(torch.zeros(4))}, {})
    w = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="w"):
        Apollo({"w": w}, {"w": w})


def test_non_finite_update_pickles() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(NonFiniteUpdate("layer.w", "non-finite gradient")))
    assert err.name == "layer.w" and "non-finite gradient" in str(err)


# --- memory -------------------------------------------------------------------------


def test_state_bytes_is_8r_per_channel_for_apollo() -> None:
    rank = 4
    shapes = {"a": (16, 64), "b": (64, 16), "c": (32, 32)}
    params = make_params(shapes)
    norm = make_params({"norm": (10,)}, seed=1)
    opt = Apollo(params, norm)
    assert opt.state_bytes() == 8  # only the global step counter
    set_grads({**params, **norm}, torch.Generator().manual_seed(16))
    opt.step(make_settings(rank=rank))

    scalars = 8 + 4 + 8  # steps (int64), prev_update_norm (fp32), rank (int64)
    apollo_bytes = sum(8 * rank * max(shape) + scalars for shape in shapes.values())
    adamw_bytes = 8 * 10 + 8
    assert opt.state_bytes() == 8 + apollo_bytes + adamw_bytes
    state = opt.state_dict()
    for name, (m, n) in shapes.items():
        moments = state[f"apollo/{name}/exp_avg"].nbytes + state[f"apollo/{name}/exp_avg_sq"].nbytes
        assert moments / (m * n) == pytest.approx(8 * rank / min(m, n))


def test_state_dict_snapshot_survives_later_steps():
    """The trainer saves a snapshot in the background while the next step runs."""
    w = torch.nn.Parameter(torch.randn(8, 16))
    b = torch.nn.Parameter(torch.randn(8))
    opt = Apollo({"w": w}, {"b": b})
    for _ in range(3):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        if opt.steps == 2:
            snapshot = opt.state_dict()
            frozen = {k: v.clone() for k, v in snapshot.items()}
        opt.step(OptimizerSettings(rank=4))
    assert all(torch.equal(snapshot[k], frozen[k]) for k in snapshot)
    assert not torch.equal(opt.state_dict()["apollo/w/exp_avg"], frozen["apollo/w/exp_avg"])


# --- mixtures of experts: a 3-D weight is a batch of matrices --------------------------


@pytest.mark.parametrize("rank", [1, 3])
def test_an_experts_tensor_steps_each_matrix_as_the_reference_does(rank: int) -> None:
    """A fused [experts, m, n] weight: each expert matrix gets exactly the reference's
    APOLLO step with its own moments and limiter (the projection, regenerated from the
    tensor's name, is shared). An expert no token reached (zero gradient) stays put."""
    settings = make_settings(rank=rank, lr=1e-2, norm_growth_limit=1.01, weight_decay=0.0)
    experts, shape = 3, (4, 6)
    params = make_params({"experts": (experts, *shape)})
    start = params["experts"].detach().clone()
    weights = [start[e].clone() for e in range(experts)]
    states = [new_ref_state() for _ in range(experts)]
    opt = Apollo(params, {})
    gen = torch.Generator().manual_seed(5)
    for t in range(1, 5):
        grad = torch.randn(experts, *shape, generator=gen) * t  # growing: the limiter bites
        grad[2] = 0.0  # expert 2 was never routed to
        params["experts"].grad = grad
        opt.step(settings)
        p = ref_projection("experts", shape, settings, t)
        for e in range(experts):
            weights[e] = ref_apollo_step(weights[e], grad[e], p, states[e], settings, settings.lr)
    for e in range(experts):
        torch.testing.assert_close(
            params["experts"][e].detach().double(), weights[e], rtol=1e-5, atol=1e-6
        )
    assert torch.equal(params["experts"][2].detach(), start[2])
    assert not torch.equal(params["experts"][0].detach(), start[0])
    state = opt.state_dict()
    assert state["apollo/experts/exp_avg"].shape[0] == experts
    assert state["apollo/experts/prev_update_norm"].shape == (experts, 1, 1)
    Apollo(params, {}).load_state_dict(state)  # the saved shapes are the ones it checks


def test_the_update_size_limit_names_the_expert_it_would_move_too_far() -> None:
    params = make_params({"experts": (3, 4, 6)})
    grad = torch.zeros(3, 4, 6)
    grad[1] = 1e3  # only expert 1 is routed to, hard
    params["experts"].grad = grad
    with pytest.raises(Exception, match=r"experts\[1\]: the step would move it by"):
        Apollo(params, {}).prepare(make_settings(lr=0.5), max_update_ratio=0.1)
