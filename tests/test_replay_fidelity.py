"""The backward pass replays the vector field as the forward pass saw it, like ``torch.utils.checkpoint`` promises.

Each test compares with backprop through the same steps (``torchdiffeq.odeint`` / torchdyn ``sensitivity="autograd"``,
fixed-grid solvers or a fixed ``first_step``), whose backward pass re-runs no user code: randomness drawn by the field,
autocast, hooks on parameters, module buffers, in-place edits of the solution, and a field that changes between the
forward pass and ``backward()``.
"""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from helpers import rel_error
from torch import nn

from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint
from symadj_plugins.torchdiffeq.host import _TorchdiffeqHost

torchdyn = pytest.importorskip("torchdyn")
from torchdyn.core import NeuralODE  # noqa: E402

T = torch.linspace(0.0, 1.0, 4, dtype=torch.float64)
FIXED_GRID = dict(method="rk4", options=dict(step_size=0.125))
ADAPTIVE = dict(method="dopri5", rtol=1e-6, atol=1e-8, options=dict(first_step=0.05))


pytestmark = pytest.mark.usefixtures("registered")


class NoisyField(nn.Module):
    """A field that draws random numbers on every call: Dropout and additive noise."""

    def __init__(self, dim=4, width=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Dropout(0.3), nn.Linear(width, dim))

    def forward(self, t, y, args=None):  # args: torchdyn passes it to fields that take t
        return self.net(y) + 0.05 * torch.randn_like(y)


def _solve_both(field, y0, solve_ours, solve_reference, seed=7):
    """Forward + backward by ours and by the reference from the same random state; returns outputs, gradients and
    the next random number after each (backprop's backward draws none, and neither may ours)."""
    results = []
    for solve in (solve_ours, solve_reference):
        torch.manual_seed(seed)
        y = y0.clone().requires_grad_(True)
        out = solve(field, y)
        grads = torch.autograd.grad(out.pow(2).sum(), (y, *field.parameters()))
        results.append((out.detach(), grads, torch.rand(())))
    return results


# A field that draws fresh noise per call defeats an error controller at tight tolerances: loose ones for dopri5.
NOISY_ADAPTIVE = dict(method="dopri5", rtol=1e-2, atol=1e-2, options=dict(first_step=0.05))


@pytest.mark.parametrize("config", [FIXED_GRID, NOISY_ADAPTIVE], ids=["rk4", "dopri5"])
def test_random_numbers_drawn_by_the_field_are_replayed_torchdiffeq(config):
    torch.manual_seed(0)
    field = NoisyField().double()
    y0 = torch.randn(8, 4, dtype=torch.float64)
    (out, grads, after), (ref_out, ref_grads, ref_after) = _solve_both(
        field, y0, lambda f, y: odeint_symplectic_adjoint(f, y, T, **config),
        lambda f, y: torchdiffeq.odeint(f, y, T, **config))
    assert torch.equal(out, ref_out)
    assert rel_error(grads, ref_grads) < 1e-10
    assert torch.equal(after, ref_after)  # the replay put the generator back


def test_random_numbers_drawn_by_the_field_are_replayed_torchdyn():
    torch.manual_seed(0)
    field = NoisyField().double()
    y0 = torch.randn(8, 4, dtype=torch.float64)
    t_span = torch.linspace(0, 1, 9, dtype=torch.float64)

    def solve(sensitivity):
        model = NeuralODE(field, solver="rk4", sensitivity=sensitivity, return_t_eval=False)
        return lambda f, y: model(y, t_span)

    (out, grads, after), (ref_out, ref_grads, ref_after) = _solve_both(
        field, y0, solve("symplectic_adjoint"), solve("autograd"))
    assert torch.equal(out, ref_out)
    assert rel_error(grads, ref_grads) < 1e-10
    assert torch.equal(after, ref_after)


def test_the_time_gradient_does_not_move_the_generator():
    """With ``t`` requiring grad, the t-gradient formula evaluates f afresh; that must not move the user's generator
    (backprop's backward draws nothing). torchdyn's adapter does not differentiate t_span."""
    torch.manual_seed(0)
    field = NoisyField().double()
    y0 = torch.randn(8, 4, dtype=torch.float64)
    after = {}
    for name, solve in (("ours", odeint_symplectic_adjoint), ("backprop", torchdiffeq.odeint)):
        torch.manual_seed(7)
        t = T.clone().requires_grad_(True)
        grad_t = torch.autograd.grad(solve(field, y0, t, **FIXED_GRID).pow(2).sum(), t)[0]
        assert grad_t.abs().sum() > 0
        after[name] = torch.rand(())
    assert torch.equal(after["ours"], after["backprop"])


def test_deterministic_field_keeps_no_random_state():
    field = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).double()
    y0 = torch.randn(3, 4, dtype=torch.float64)
    host_solve = _TorchdiffeqHost.solve
    seen = []

    def spy(self, y, t):
        solution, trajectory = host_solve(self, y, t)
        seen.append(trajectory.stage_rng)
        return solution, trajectory

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_TorchdiffeqHost, "solve", spy)
        odeint_symplectic_adjoint(lambda t, y: field(y), y0, T, adjoint_params=tuple(field.parameters()),
                                  **FIXED_GRID)
    assert seen == [None]


def test_cubic_interpolation_with_random_numbers_is_refused():
    field = NoisyField().double()
    y0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="interp='cubic'"):
        odeint_symplectic_adjoint(field, y0, T, method="rk4", options=dict(step_size=0.125, interp="cubic"))


class MLPField(nn.Module):
    def __init__(self, dim=4, width=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, y, args=None):
        return self.net(y).to(y.dtype)


@pytest.mark.parametrize("cache_enabled", [False, True], ids=["no weight cache", "weight cache"])
def test_autocast_state_of_the_forward_pass_is_re_entered(cache_enabled):
    torch.manual_seed(1)
    field = MLPField()
    y0 = torch.randn(16, 4)
    grads = {}
    for name, solve in (("ours", odeint_symplectic_adjoint), ("backprop", torchdiffeq.odeint)):
        y = y0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache_enabled):
            out = solve(field, y, T.float(), **FIXED_GRID)
        grads[name] = torch.autograd.grad(out.pow(2).sum(), (y, *field.parameters()))  # outside autocast, as usual
    # Replayed in float32 instead, the end states differ (the replay check raises) and the gradients by 3e-3.
    assert rel_error(grads["ours"][:1], grads["backprop"][:1]) < 1e-6
    # With autocast's weight cache, backprop casts each weight to bf16 once and sums the gradients of all the stages
    # that used it in bf16 before casting back; the replay casts per stage and sums in float32. Without the cache both
    # sum in float32.
    assert rel_error(grads["ours"][1:], grads["backprop"][1:]) < (3e-2 if cache_enabled else 1e-6)


class LowPrecisionField(MLPField):
    def forward(self, t, y, args=None):
        return self.net(y)  # bfloat16 under autocast: not cast back to the state's dtype


@pytest.mark.parametrize("adapter", ["torchdiffeq", "torchdyn"])
@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_a_field_returning_bfloat16_under_autocast_gets_a_clear_dtype_error(adapter, method):
    field, y0 = LowPrecisionField(), torch.randn(3, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.raises(ValueError, match=r"dtype torch.bfloat16.*dtype torch.float32"):
        if adapter == "torchdiffeq":
            odeint_symplectic_adjoint(field, y0, T.float(), method=method, options=FIXED_GRID["options"]
                                      if method == "rk4" else None)
        else:
            NeuralODE(field, solver=method, sensitivity="symplectic_adjoint")(y0, torch.linspace(0, 1, 5))


class HookCounter:
    def __init__(self):
        self.calls = 0

    def __call__(self, grad):
        self.calls += 1
        return 2 * grad


def _hooked_gradients(solve, field, y0):
    counters = [HookCounter() for _ in field.parameters()]
    handles = [p.register_hook(c) for p, c in zip(field.parameters(), counters)]
    try:
        y = y0.clone().requires_grad_(True)
        solve(field, y).pow(2).sum().backward()
    finally:
        for h in handles:
            h.remove()
    grads = [p.grad.clone() for p in field.parameters()]
    field.zero_grad(set_to_none=True)
    return grads, [c.calls for c in counters]


def _ours_and_backprop(adapter):
    """``(ours, backprop)`` as ``solve(field, y)`` for one adapter: torchdiffeq (dopri5, first step fixed) or torchdyn
    (rk4 over 8 steps)."""
    if adapter == "torchdiffeq":
        return (lambda f, y: odeint_symplectic_adjoint(f, y, T, **ADAPTIVE),
                lambda f, y: torchdiffeq.odeint(f, y, T, **ADAPTIVE))
    t_span = torch.linspace(0, 1, 9, dtype=torch.float64)

    def solve(sensitivity):
        return lambda f, y: NeuralODE(f, solver="rk4", sensitivity=sensitivity, return_t_eval=False)(y, t_span)

    return solve("symplectic_adjoint"), solve("autograd")


@pytest.mark.parametrize("adapter", ["torchdiffeq", "torchdyn"])
def test_parameter_hooks_fire_once_on_the_total_gradient(adapter):
    torch.manual_seed(2)
    field = MLPField().double()
    y0 = torch.randn(8, 4, dtype=torch.float64)
    solve_ours, solve_backprop = _ours_and_backprop(adapter)
    ours, ours_calls = _hooked_gradients(solve_ours, field, y0)
    ref, ref_calls = _hooked_gradients(solve_backprop, field, y0)
    assert ours_calls == [1] * len(ref) and ref_calls == [1] * len(ref)
    assert rel_error(ours, ref) < 1e-10


class BatchNormField(nn.Module):
    def __init__(self, dim=4, width=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.BatchNorm1d(width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, y):
        return self.net(y)


@pytest.mark.parametrize("config", [FIXED_GRID, ADAPTIVE], ids=["rk4", "dopri5"])
def test_batchnorm_running_statistics_end_as_backprop_leaves_them(config):
    torch.manual_seed(3)
    y0 = torch.randn(16, 4, dtype=torch.float64)
    states, grads = {}, {}
    for name, solve in (("ours", odeint_symplectic_adjoint), ("backprop", torchdiffeq.odeint)):
        torch.manual_seed(4)
        field = BatchNormField().double().train()
        y = y0.clone().requires_grad_(True)
        out = solve(field, y, T, **config)
        grads[name] = torch.autograd.grad(out.pow(2).sum(), (y, *field.parameters()))
        states[name] = {k: v.clone() for k, v in field.state_dict().items()}
    bn = "net.1."
    assert int(states["ours"][bn + "num_batches_tracked"]) == int(states["backprop"][bn + "num_batches_tracked"])
    for key in ("running_mean", "running_var"):
        assert torch.equal(states["ours"][bn + key], states["backprop"][bn + key])
    # The first Linear's bias has a zero gradient (BatchNorm removes the mean): both are rounding noise there.
    without_bias = [0, 1, *range(3, len(grads["ours"]))]
    assert rel_error(*([g[i] for i in without_bias] for g in (grads["ours"], grads["backprop"]))) < 1e-10
    assert float(grads["ours"][2].abs().max()) < 1e-12 * float(grads["backprop"][1].abs().max())


@pytest.mark.parametrize("config", [FIXED_GRID, ADAPTIVE], ids=["rk4", "dopri5"])
def test_batchnorm_in_a_function_field_ends_as_backprop_leaves_it(config):
    """A lambda closing over a module (with adjoint_params): its modules are found while it runs, and their running
    statistics end as backprop leaves them, as for a module field."""
    torch.manual_seed(3)
    y0 = torch.randn(16, 4, dtype=torch.float64)
    states, grads = {}, {}
    for name, solve in (("ours", odeint_symplectic_adjoint), ("backprop", torchdiffeq.odeint)):
        torch.manual_seed(4)
        net = BatchNormField().net.double().train()
        y = y0.clone().requires_grad_(True)
        extra = dict(adjoint_params=tuple(net.parameters())) if name == "ours" else {}
        out = solve(lambda t, y_, net=net: net(y_), y, T, **config, **extra)
        grads[name] = torch.autograd.grad(out.pow(2).sum(), (y, *net.parameters()))
        states[name] = {k: v.clone() for k, v in net.state_dict().items()}
    assert int(states["ours"]["1.num_batches_tracked"]) == int(states["backprop"]["1.num_batches_tracked"])
    for key in ("running_mean", "running_var"):
        assert torch.equal(states["ours"]["1." + key], states["backprop"]["1." + key])
    without_bias = [0, 1, *range(3, len(grads["ours"]))]  # the first bias: rounding noise in both (see above)
    assert rel_error(*([g[i] for i in without_bias] for g in (grads["ours"], grads["backprop"]))) < 1e-10


class CallsAnUnregisteredModule(nn.Module):
    """A module field that calls a module it does not hold as a submodule (kept in a list): its parameters are not
    among the field's parameters()."""

    def __init__(self, net):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.held = [net]

    def forward(self, t, y, args=None):
        return self.scale * self.held[0](y)


# torchdiffeq needs adjoint_params for a function field: then the parameters differentiated are the caller's choice.
@pytest.mark.parametrize(("adapter", "field_kind"), [("torchdyn", "function"), ("torchdyn", "unregistered submodule"),
                                                     ("torchdiffeq", "unregistered submodule")])
def test_parameters_the_field_uses_but_the_solve_did_not_find_are_refused(adapter, field_kind):
    """Where the adapter finds the parameters itself (torchdyn; torchdiffeq without adjoint_params), a module the field
    calls with other parameters that require grad would silently get no gradient (backprop gives it one): refused
    when the solve starts."""
    net = MLPField().net.double()
    field = (lambda t, y, args=None: net(y)) if field_kind == "function" else CallsAnUnregisteredModule(net)
    y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="whose parameters .* require grad but are not among the parameters"):
        if adapter == "torchdyn":
            NeuralODE(field, solver="rk4", sensitivity="symplectic_adjoint")(y0, torch.linspace(0, 1, 5).double())
        else:
            odeint_symplectic_adjoint(field, y0, T, **FIXED_GRID)
    if adapter == "torchdiffeq":  # listed by the caller: differentiated as listed, as torchdiffeq.odeint_adjoint does
        out = odeint_symplectic_adjoint(field, y0, T, adjoint_params=tuple(net.parameters()), **FIXED_GRID)
        ref = torchdiffeq.odeint(field, y0, T, **FIXED_GRID)
        wrt = (y0, *net.parameters())
        assert rel_error(torch.autograd.grad(out.sum(), wrt), torch.autograd.grad(ref.sum(), wrt)) < 1e-10


@pytest.mark.parametrize("field_kind", ["module", "function"])
@pytest.mark.parametrize("parametrization", ["hook", "parametrize"])
def test_spectral_norm_in_training_mode_is_refused(parametrization, field_kind):
    torch.manual_seed(5)
    norm = nn.utils.spectral_norm if parametrization == "hook" else nn.utils.parametrizations.spectral_norm
    net = nn.Sequential(norm(nn.Linear(4, 4)), nn.Tanh()).double()
    y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    # A plain function around the module is refused like a module field: its modules are found while it runs.
    field = _ModuleField(net) if field_kind == "module" else (lambda t, y: net(y))
    extra = {} if field_kind == "module" else dict(adjoint_params=tuple(net.parameters()))
    with pytest.raises(ValueError, match="changes its own function on every call.*eval mode"):
        odeint_symplectic_adjoint(field, y0, T, **FIXED_GRID, **extra)
    net.eval()  # fixed weights: exact
    out = odeint_symplectic_adjoint(field, y0, T, **FIXED_GRID, **extra)
    ref = torchdiffeq.odeint(field, y0, T, **FIXED_GRID)
    assert rel_error(torch.autograd.grad(out.sum(), y0), torch.autograd.grad(ref.sum(), y0)) < 1e-10


class _ModuleField(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)


class CountingField(MLPField):
    """Counts its evaluations in a buffer, as FFJORD's ODEfunc does: a buffer updated in place that does not change
    the function."""

    def __init__(self):
        super().__init__()
        self.register_buffer("num_evals", torch.tensor(0.0))

    def forward(self, t, y, args=None):
        self.num_evals += 1
        return super().forward(t, y)


def test_a_buffer_that_does_not_change_the_function_is_fine_and_ends_as_backprop_leaves_it():
    torch.manual_seed(6)
    y0 = torch.randn(4, 4, dtype=torch.float64)
    evals, grads = {}, {}
    for name, solve in (("ours", odeint_symplectic_adjoint), ("backprop", torchdiffeq.odeint)):
        torch.manual_seed(6)
        field = CountingField().double()
        y = y0.clone().requires_grad_(True)
        out = solve(field, y, T, **FIXED_GRID)
        grads[name] = torch.autograd.grad(out.sum(), (y, *field.parameters()))
        evals[name] = float(field.num_evals)
    assert evals["ours"] == evals["backprop"] == 4 * 8
    assert rel_error(grads["ours"], grads["backprop"]) < 1e-10


class ScaledField(MLPField):
    def __init__(self):
        super().__init__()
        self.scale = 1.0

    def forward(self, t, y, args=None):
        return self.scale * super().forward(t, y)


def _solve_scaled(adapter, field, y0, budget):
    import symadj_plugins

    with symadj_plugins.options(memory_budget=budget):
        if adapter == "torchdiffeq":
            return odeint_symplectic_adjoint(field, y0, T, **ADAPTIVE)
        model = NeuralODE(field, solver="dopri5", sensitivity="symplectic_adjoint", return_t_eval=False)
        return model(y0, torch.linspace(0, 1, 3, dtype=torch.float64))


@pytest.mark.parametrize("budget", ["min", "trajectory", "stages", "auto", 20_000, "max"])
@pytest.mark.parametrize("adapter", ["torchdiffeq", "torchdyn"])
def test_a_field_changed_between_forward_and_backward_fails_loudly_or_gets_backprops_gradient(adapter, budget):
    # Backprop differentiates the function the forward pass computed. A step whose graphs the forward pass kept does
    # the same (it evaluates nothing again); a step that evaluates f again must then notice the change and refuse.
    torch.manual_seed(7)
    field = ScaledField().double()
    y0 = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    reference = torch.autograd.grad(_solve_scaled(adapter, field, y0, "trajectory").sum(), (y0, *field.parameters()))
    out = _solve_scaled(adapter, field, y0, budget)
    field.scale = 1.001  # e.g. an attribute a training loop sets per epoch, set before backward()
    try:
        grads = torch.autograd.grad(out.sum(), (y0, *field.parameters()))
    except RuntimeError as error:
        assert "did not reproduce the forward pass" in str(error)
        assert budget != "max"  # at "max" nothing is evaluated again
    else:
        assert budget not in ("min", "trajectory", "stages")  # these evaluate every stage again
        assert rel_error(grads, reference) < 1e-10


@pytest.mark.parametrize("adapter", ["torchdiffeq", "torchdyn"])
def test_writing_into_the_solution_before_backward_works_as_with_backprop(adapter):
    torch.manual_seed(8)
    field = MLPField().double()
    y0 = torch.randn(4, 4, dtype=torch.float64)
    t_span = torch.linspace(0, 1, 9, dtype=torch.float64)
    grads = {}
    for name in ("ours", "backprop"):
        y = y0.clone().requires_grad_(True)
        if adapter == "torchdiffeq":
            solve = odeint_symplectic_adjoint if name == "ours" else torchdiffeq.odeint
            out = solve(field, y, T, **FIXED_GRID)
        else:
            sensitivity = "symplectic_adjoint" if name == "ours" else "autograd"
            out = NeuralODE(field, solver="rk4", sensitivity=sensitivity, return_t_eval=False)(y, t_span)
        out[0] = 0.0
        out[-1] *= 2.0
        grads[name] = torch.autograd.grad(out.pow(2).sum(), (y, *field.parameters()))
    assert rel_error(grads["ours"], grads["backprop"]) < 1e-10


def test_torch_func_transforms_and_forward_mode_get_a_clear_error():
    field = MLPField().double()
    y0 = torch.randn(3, 4, dtype=torch.float64)

    def final_sum(y):
        return odeint_symplectic_adjoint(field, y, T, **FIXED_GRID)[-1].sum()

    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(final_sum)(y0)
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.vmap(final_sum)(y0[None].expand(2, 3, 4))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(y0, torch.ones_like(y0))
        with pytest.raises(NotImplementedError, match="forward-mode"):
            final_sum(dual)


class LateNoiseField(MLPField):
    """Deterministic during the first step, random afterwards: its late random numbers cannot be replayed."""

    def forward(self, t, y, args=None):
        out = super().forward(t, y)
        return out + 0.01 * torch.randn_like(out) if float(t) > 0.5 else out


def test_random_numbers_first_drawn_after_the_first_step_are_refused():
    field = LateNoiseField().double()
    y0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    # Refused at the end of the forward pass while no other thread runs (whose draws the generator would also show);
    # otherwise the replay check refuses the backward pass: never a gradient computed with other random numbers.
    with pytest.raises((ValueError, RuntimeError),
                       match="after a first step that drew none|did not reproduce the forward pass"):
        odeint_symplectic_adjoint(field, y0, T, **FIXED_GRID).sum().backward()


# --------------------------------------------------------------------------------------------------------
# Random numbers and threads: torch has one generator per device for all threads. A solve must not mistake
# another thread's draws for its field's, and fields that draw in two threads at once must each replay their own.

class LoggedNoiseField(MLPField):
    """Draws a dropout-like mask and additive noise on every call and logs them (``drawn``); with ``given`` set, it
    uses those draws instead, in order: backprop through the forward pass's very random numbers is the reference."""

    def __init__(self):
        super().__init__()
        self.drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.given = None

    def forward(self, t, y, args=None):
        h = torch.tanh(self.net[0](y))
        if self.given is None:
            mask, noise = (torch.rand_like(h) > 0.3).to(h.dtype) / 0.7, 0.05 * torch.randn_like(y)
            self.drawn.append((mask, noise))
        else:
            mask, noise = next(self.given)
        return self.net[2](h * mask) + noise


def _backprop_with_the_same_draws(field, y0, drawn, solve_kwargs):
    field.given = iter(drawn)
    try:
        y = y0.clone().requires_grad_(True)
        out = torchdiffeq.odeint(field, y, T, **solve_kwargs)
        return torch.autograd.grad(out.pow(2).sum(), (y, *field.parameters()))
    finally:
        field.given = None


@pytest.mark.parametrize("adapter", ["torchdiffeq", "torchdyn"])
def test_a_solve_is_not_disturbed_by_another_thread_drawing_random_numbers(adapter):
    from helpers import run_in_threads

    torch.manual_seed(8)
    field = MLPField().double()
    y0 = torch.randn(4, 4, dtype=torch.float64)
    t_span = torch.linspace(0, 1, 9, dtype=torch.float64)

    def gradient():
        y = y0.clone().requires_grad_(True)
        if adapter == "torchdiffeq":
            out = odeint_symplectic_adjoint(field, y, T, **FIXED_GRID)
        else:
            out = NeuralODE(field, solver="rk4", sensitivity="symplectic_adjoint", return_t_eval=False)(y, t_span)
        return torch.autograd.grad(out.pow(2).sum(), (y, *field.parameters()))

    reference = gradient()
    done, errors = [], []

    def solve_many():
        try:
            for _ in range(30):
                assert all(torch.equal(g, r) for g, r in zip(gradient(), reference))
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            done.append(True)

    def draw_meanwhile():
        while not done:
            torch.randn(16)

    roles = [solve_many, draw_meanwhile]
    run_in_threads(lambda: roles.pop()(), 2)
    assert not errors, errors[:1]


def test_fields_drawing_random_numbers_in_two_threads_at_once_each_replay_their_own():
    from helpers import run_in_threads

    y0 = torch.randn(4, 4, dtype=torch.float64)
    torch.manual_seed(9)
    fields = [LoggedNoiseField().double() for _ in range(2)]  # made here: only the solves draw in the threads
    errors, compared = [], []

    def solve_many():
        field = fields.pop()
        try:
            for _ in range(15):
                field.drawn.clear()
                y = y0.clone().requires_grad_(True)
                out = odeint_symplectic_adjoint(field, y, T, **FIXED_GRID)
                drawn = list(field.drawn)  # the forward pass's draws (the replay's are logged after them)
                grads = torch.autograd.grad(out.pow(2).sum(), (y, *field.parameters()))
                reference = _backprop_with_the_same_draws(field, y0, drawn, FIXED_GRID)
                compared.append(rel_error(grads, reference))
        except Exception as exc:  # reported below
            errors.append(exc)

    run_in_threads(solve_many, 2)
    assert not errors, errors[:1]
    assert len(compared) == 30 and max(compared) < 1e-10


def test_torchdyn_adaptive_fields_drawing_in_two_threads_at_once_replay_their_own():
    """torchdyn's adaptive solve evaluates f outside its steps (k1 = f(t_0, x_0), the initial step's probe): those
    draws are watched per thread too. Without that, about one solve in five fails the replay check."""
    from helpers import run_in_threads

    torch.manual_seed(10)
    fields = [NoisyField().double() for _ in range(2)]
    x = torch.randn(4, 4, dtype=torch.float64)
    t_span = torch.linspace(0, 1, 3, dtype=torch.float64)
    errors, solved = [], []

    def solve_many():
        model = NeuralODE(fields.pop(), solver="dopri5", sensitivity="symplectic_adjoint", atol=1e-2, rtol=1e-2)
        try:
            for _ in range(15):
                y = x.clone().requires_grad_(True)
                _, sol = model(y, t_span)
                torch.autograd.grad(sol.pow(2).sum(), y)  # the replay check compares every replayed step
                solved.append(True)
        except Exception as exc:  # reported below
            errors.append(exc)

    run_in_threads(solve_many, 2)
    assert not errors, errors[:1]
    assert len(solved) == 30
