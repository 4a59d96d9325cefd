"""``symadj_plugins.core`` on its own, with no host library: tableaux, stage plans, the trajectory record, the
reverse sweep on a toy host against backprop, and the replay utilities.

The toy host below is the smallest :class:`HostSolver` there is (explicit RK with a given tableau, fixed steps,
outputs only at step ends); what it checks is the core's promise: the gradient equals backprop through the same
steps, for any explicit tableau.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from helpers import rel_error

from symadj_plugins.core import ButcherTableau, HostSolver, StageCall, Trajectory, odeint_symplectic
from symadj_plugins.core.replay import AutocastState, RandomnessWatch, ReplayCheck, RngState, hooks_suspended
from symadj_plugins.core.tableaux import EULER, MIDPOINT, RK4_38, RK4_CLASSICAL

F64 = torch.float64

DOPRI5 = ButcherTableau.from_rows(
    [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],
    [[1 / 5],
     [3 / 40, 9 / 40],
     [44 / 45, -56 / 15, 32 / 9],
     [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
     [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
     [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0],
    name="dopri5")
"""Seven stages, FSAL, two zero weights (``b_2 = b_7 = 0``)."""

DEAD_LAST = ButcherTableau.from_rows([0.0, 1.0], [[1.0]], [1.0, 0.0], name="dead last")
"""Euler with a second stage that nothing reads (``b_2 = 0``, no later stage): its VJP can always be skipped."""


# --------------------------------------------------------------------------------------------------------
# Tableau validation and derived facts

@pytest.mark.parametrize("c, a, b, message", [
    ((), (), (), "needs at least one stage"),
    ((0.0,), ((0.0,),), (0.5, 0.5), r"c, a and b must describe the same number of stages \(2\)"),
    ((0.0, 1.0), ((0.0, 0.0),), (0.5, 0.5), r"same number of stages \(2\)"),
    ((0.0, 1.0), ((0.0, 0.0), (1.0,)), (0.5, 0.5), r"same number of stages \(2\)"),
    ((0.0, 1.0), ((0.0, 0.0), (1.0, 0.0)), (0.5, math.nan), "entries must be finite"),
    ((0.0, math.inf), ((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5), "entries must be finite"),
    ((0.0, 1.0), ((0.0, 0.0), (-math.inf, 0.0)), (0.5, 0.5), "entries must be finite"),
    ((0.0, 1.0), ((1.0, 0.0), (1.0, 0.0)), (0.5, 0.5), "strictly lower triangular .* row 0 has entries on or above"),
    ((0.0, 1.0), ((0.0, 0.5), (1.0, 0.0)), (0.5, 0.5), "strictly lower triangular .* row 0"),
    ((0.0, 1.0), ((0.0, 0.0), (1.0, 0.5)), (0.5, 0.5), "strictly lower triangular .* row 1"),
])
def test_invalid_tableau_raises_a_value_error_naming_the_tableau(c, a, b, message):
    with pytest.raises(ValueError, match=f"^my tableau: .*{message}"):
        ButcherTableau(c, a, b, name="my tableau")


@pytest.mark.parametrize("c, rows, b, message", [
    ([0.0, 0.5], [], [0.0, 1.0], "expected 1 rows of a for 2 stages, got 0"),
    ([0.0, 0.5], [[0.5], [0.1, 0.2]], [0.0, 1.0], "expected 1 rows of a for 2 stages, got 2"),
    ([0.0, 0.5], [[0.5, 0.5]], [0.0, 1.0], "row 1 of a has 2 entries; an explicit stage 1 has at most 1"),
    ([0.0, 0.5, 1.0], [[0.5], [0.1, 0.2, 0.3]], [0.0, 0.0, 1.0], "row 2 of a has 3 entries"),
    ([0.0, 0.5], [[math.nan]], [0.0, 1.0], "tableau entries must be finite"),
    ([0.0], [[0.5]], [1.0, 0.0], "c, a and b must describe the same number of stages"),
])
def test_from_rows_raises_a_value_error_naming_the_tableau(c, rows, b, message):
    with pytest.raises(ValueError, match=f"^my rows: {message}"):
        ButcherTableau.from_rows(c, rows, b, name="my rows")


def test_from_rows_fills_the_full_strictly_lower_stage_matrix():
    tableau = ButcherTableau.from_rows([0, 1 / 3, 2 / 3], [[1 / 3], [0, 2 / 3]], [1, 0, 3], name="t")
    assert tableau.a == ((0.0, 0.0, 0.0), (1 / 3, 0.0, 0.0), (0.0, 2 / 3, 0.0))
    assert tableau.b == (1.0, 0.0, 3.0) and all(type(x) is float for x in (*tableau.b, *tableau.c))
    # A short row is padded with zeros, as tableaux are printed.
    short = ButcherTableau.from_rows([0, 0.5, 1], [[0.5], [1.0]], [0, 0, 1])
    assert short.a[2] == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("tableau, stages, fsal", [
    (EULER, 1, False), (MIDPOINT, 2, False), (RK4_CLASSICAL, 4, False), (RK4_38, 4, False), (DOPRI5, 7, True),
    (DEAD_LAST, 2, True),  # k_2 = f(t + h, y + h k_1) = f(t_{n+1}, y_{n+1}) since b = (1, 0)
])
def test_num_stages_and_fsal_are_derived(tableau, stages, fsal):
    assert tableau.num_stages == stages
    assert tableau.fsal is fsal


def test_fsal_needs_the_last_row_to_equal_the_weights_and_the_last_node_one():
    rows = [[0.5], [0.25, 0.75]]
    assert ButcherTableau.from_rows([0, 0.5, 1], rows, [0.25, 0.75, 0]).fsal
    with pytest.raises(ValueError, match=r"tableau: node c\[2\] = 0.9 is not the sum of row 2 of a"):
        ButcherTableau.from_rows([0, 0.5, 0.9], rows, [0.25, 0.75, 0])                 # c has one meaning: the nodes
    assert not ButcherTableau.from_rows([0, 0.5, 1], rows, [0.3, 0.7, 0]).fsal          # a_s != b
    assert not ButcherTableau.from_rows([0, 0.5, 1], rows, [0.25, 0.75, 0.1]).fsal      # b_s != 0


def test_tensors_are_the_tableau_in_the_requested_dtype_and_cached():
    a, b = DOPRI5.tensors(F64, torch.device("cpu"))
    assert a.shape == (7, 7) and b.shape == (7,) and a.dtype == b.dtype == F64
    assert a.tolist() == [list(row) for row in DOPRI5.a] and b.tolist() == list(DOPRI5.b)
    again = DOPRI5.tensors(F64, "cpu")  # a device given as a string is the same cache entry
    assert again[0] is a and again[1] is b
    a32, b32 = DOPRI5.tensors(torch.float32, torch.device("cpu"))
    assert a32.dtype == b32.dtype == torch.float32 and a32 is not a
    # Rounded once from float64, not accumulated in float32.
    assert torch.equal(a32, a.float()) and torch.equal(b32, b.float())


# --------------------------------------------------------------------------------------------------------
# Stage-plan pruning

def test_an_untouched_zero_weight_last_stage_is_not_differentiated():
    plan = DOPRI5.backward_plan((False,) * 7)
    # Stage 2 has b_2 = 0 but later stages read k_2; stage 7 (b_7 = 0) is read by none.
    assert plan.vjp == (True,) * 6 + (False,)
    # k_6 is read only by stage 7, which is not differentiated: no stage needs its value.
    assert plan.value == (True,) * 5 + (False, False)


def test_a_touched_zero_weight_stage_is_differentiated_and_its_inputs_recomputed():
    plan = DOPRI5.backward_plan((False,) * 6 + (True,))
    assert plan.vjp == (True,) * 7
    assert plan.value == (True,) * 6 + (False,)  # the last stage's value is never needed by a later stage


def test_a_stage_nothing_reads_is_pruned_and_restored_when_touched():
    assert DEAD_LAST.backward_plan((False, False)).vjp == (True, False)
    assert DEAD_LAST.backward_plan((False, False)).value == (False, False)
    assert DEAD_LAST.backward_plan((False, True)).vjp == (True, True)
    assert DEAD_LAST.backward_plan((False, True)).value == (True, False)
    # Midpoint's first weight is zero but stage 2 reads it.
    assert MIDPOINT.backward_plan((False, False)).vjp == (True, True)
    assert MIDPOINT.backward_plan((False, False)).value == (True, False)


@pytest.mark.parametrize("touched", [(), (False,) * 6, (False,) * 8])
def test_touched_of_the_wrong_length_is_a_value_error(touched):
    with pytest.raises(ValueError, match=f"touched has {len(touched)} entries for a 7-stage tableau"):
        DOPRI5.backward_plan(touched)


# --------------------------------------------------------------------------------------------------------
# Trajectory.pack / unpack

@dataclass
class _HostData:
    """A host's own record, as an adapter would define it: tensors nested in lists, dicts and tuples."""

    per_step: list[torch.Tensor]
    by_name: dict[str, torch.Tensor]
    nested: list[dict[str, tuple[torch.Tensor, int]]]
    label: str
    count: int


def _tensor(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64)


def _full_trajectory() -> tuple[Trajectory, list[torch.Tensor]]:
    """A trajectory of 3 steps with every optional part filled, and every tensor it holds (by reference)."""
    states = [_tensor(2, 3) for _ in range(4)]
    t0, t1, dt = _tensor(3), _tensor(3), _tensor(3)
    carried = [None, _tensor(2, 3), None]
    host_data = _HostData(per_step=[_tensor(4), _tensor(4)], by_name={"x": _tensor(1), "y": _tensor(2)},
                          nested=[{"p": (_tensor(3), 7)}, {"q": (_tensor(5), 8)}], label="data", count=2)
    stage_inputs = [_tensor(4, 2, 3) for _ in range(3)]
    stage_rng = [[RngState(torch.get_rng_state()), None], [None, None], [None, RngState(torch.get_rng_state())]]
    trajectory = Trajectory(states, t0, t1, dt, carried, {0: [1], 2: [2, 3]}, host_data, stage_inputs, stage_rng)
    held = [*states, t0, t1, dt, carried[1], *host_data.per_step, *host_data.by_name.values(),
            host_data.nested[0]["p"][0], host_data.nested[1]["q"][0], *stage_inputs,
            stage_rng[0][0].cpu, stage_rng[2][1].cpu]
    return trajectory, held


def _holds_no_tensor(structure) -> bool:
    if isinstance(structure, torch.Tensor):
        return False
    if isinstance(structure, (list, tuple)):
        return all(_holds_no_tensor(x) for x in structure)
    if isinstance(structure, dict):
        return all(_holds_no_tensor(x) for x in structure.values())
    return True


def test_pack_returns_every_tensor_the_trajectory_holds_and_a_structure_without_tensors():
    trajectory, held = _full_trajectory()
    tensors, structure = trajectory.pack()
    assert len(tensors) == len(held) == 4 + 3 + 1 + 6 + 3 + 2
    assert {id(x) for x in tensors} == {id(x) for x in held}
    assert _holds_no_tensor(structure)


def test_unpack_gives_back_the_same_tensor_objects_in_the_same_places():
    trajectory, _ = _full_trajectory()
    tensors, structure = trajectory.pack()
    back = Trajectory.unpack(tensors, structure)
    assert all(x is y for x, y in zip(back.states, trajectory.states, strict=True))
    assert back.t0 is trajectory.t0 and back.t1 is trajectory.t1 and back.dt is trajectory.dt
    assert back.carried[0] is None and back.carried[2] is None and back.carried[1] is trajectory.carried[1]
    assert back.outputs_in_step == {0: [1], 2: [2, 3]}
    data, original = back.host_data, trajectory.host_data
    assert type(data) is _HostData and (data.label, data.count) == ("data", 2)
    assert all(x is y for x, y in zip(data.per_step, original.per_step, strict=True))
    assert data.by_name.keys() == original.by_name.keys()
    assert all(data.by_name[k] is original.by_name[k] for k in original.by_name)
    assert data.nested[0]["p"][0] is original.nested[0]["p"][0] and data.nested[0]["p"][1] == 7
    assert data.nested[1]["q"][0] is original.nested[1]["q"][0] and data.nested[1]["q"][1] == 8
    assert isinstance(data.nested[0]["p"], tuple)
    assert all(x is y for x, y in zip(back.stage_inputs, trajectory.stage_inputs, strict=True))
    assert back.stage_rng[1] == [None, None] and back.stage_rng[0][1] is None and back.stage_rng[2][0] is None
    for n, i in ((0, 0), (2, 1)):
        rng = back.rng_state(n, i)
        assert isinstance(rng, RngState) and rng.cpu is trajectory.stage_rng[n][i].cpu and rng.cuda is None
    assert back.num_steps == 3


def test_unpack_with_other_tensors_puts_them_in_the_same_places():
    """What autograd hands back to backward (after saved-tensor hooks, say) is what the trajectory then holds."""
    trajectory, _ = _full_trajectory()
    tensors, structure = trajectory.pack()
    replaced = [x.clone() for x in tensors]
    back = Trajectory.unpack(replaced, structure)
    again, _ = back.pack()
    assert all(x is y for x, y in zip(again, replaced, strict=True))


def test_a_minimal_trajectory_packs_only_its_states_and_times():
    states = [_tensor(3) for _ in range(3)]
    trajectory = Trajectory(states, _tensor(2), _tensor(2), _tensor(2), [None, None], {})
    tensors, structure = trajectory.pack()
    assert len(tensors) == 3 + 3
    back = Trajectory.unpack(tensors, structure)
    assert back.host_data is None and back.stage_inputs is None and back.stage_rng is None
    assert back.rng_state(0, 0) is None


# --------------------------------------------------------------------------------------------------------
# The sweep on a toy host, against backprop

class _Field(torch.nn.Module):
    """``f(t, y) = W2 tanh(W1 y + b1) (1 + t) + 0.1 sin(3t)``: nonlinear and time-dependent."""

    def __init__(self, dim: int = 3, width: int = 8):
        super().__init__()
        self.inner = torch.nn.Linear(dim, width)
        self.outer = torch.nn.Linear(width, dim, bias=False)
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.outer(torch.tanh(self.inner(y))) * (1 + t) + 0.1 * torch.sin(3 * t)


class _ToyHost(HostSolver):
    """Explicit RK with ``tableau``, ``steps_per_interval`` equal steps between consecutive output times,
    stage ``i`` at ``t_n + c_i h``, outputs only at step ends."""

    def __init__(self, tableau: ButcherTableau, field: _Field, steps_per_interval: int):
        self.tableau, self.field, self.steps_per_interval = tableau, field, steps_per_interval

    def solve(self, y0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Trajectory]:
        states, t0, dt, outputs_in_step = [y0], [], [], {}
        for j in range(len(t) - 1):
            h = (t[j + 1] - t[j]) / self.steps_per_interval
            for m in range(self.steps_per_interval):
                t0.append(t[j] + m * h)
                dt.append(h)
                states.append(_rk_step(self.tableau, self.field, t0[-1], h, states[-1]))
            outputs_in_step[len(states) - 2] = [j + 1]
        t0, dt = torch.stack(t0), torch.stack(dt)
        solution = torch.stack([y0] + [states[n + 1] for n in sorted(outputs_in_step)])
        return solution, Trajectory(states, t0, t0 + dt, dt, [None] * len(dt), outputs_in_step)

    def stage_calls(self, trajectory: Trajectory, n: int) -> Sequence[StageCall | None]:
        return [StageCall(trajectory.t0[n] + c * trajectory.dt[n]) for c in self.tableau.c]

    def vector_field(self, t: torch.Tensor, y: torch.Tensor, kwargs: tuple) -> torch.Tensor:
        return self.field(t, y)

    def dense_output(self, trajectory: Trajectory, n: int, y0: torch.Tensor, y1: torch.Tensor,
                     k: Sequence[torch.Tensor], t_out: torch.Tensor) -> torch.Tensor:
        return y1.expand(len(t_out), *y1.shape)


def _rk_step(tableau: ButcherTableau, field: _Field, t0: torch.Tensor, h: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
    """One explicit RK step, the textbook way: differentiable by backprop when ``y`` or ``field`` are."""
    k: list[torch.Tensor] = []
    for i in range(tableau.num_stages):
        y_i = y + h * sum((a * k_j for a, k_j in zip(tableau.a[i][:i], k) if a != 0.0), torch.zeros_like(y))
        k.append(field(t0 + tableau.c[i] * h, y_i))
    return y + h * sum((b * k_i for b, k_i in zip(tableau.b, k) if b != 0.0), torch.zeros_like(y))


def _gradients(tableau: ButcherTableau, steps_per_interval: int, symplectic: bool):
    torch.manual_seed(0)
    field = _Field().double()
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=F64)
    params = list(field.parameters())
    if symplectic:
        solution = odeint_symplectic(_ToyHost(tableau, field, steps_per_interval), y0, t, params)
    else:
        with torch.enable_grad():
            solution = _ToyHost(tableau, field, steps_per_interval).solve(y0, t)[0]
    weights = torch.randn_like(solution)  # same seed, same draws: the same loss for both
    loss = (solution * weights).sum() + (solution[-1] ** 2).sum()
    return solution.detach(), torch.autograd.grad(loss, [y0, *params])


@pytest.mark.parametrize("tableau", [EULER, RK4_38, MIDPOINT, DOPRI5, DEAD_LAST], ids=lambda tb: tb.name)
def test_toy_host_gradient_equals_backprop_through_the_same_steps(tableau):
    solution, grads = _gradients(tableau, steps_per_interval=3, symplectic=True)
    ref_solution, ref_grads = _gradients(tableau, steps_per_interval=3, symplectic=False)
    assert torch.equal(solution, ref_solution)  # the same forward arithmetic
    assert rel_error(grads, ref_grads) <= 1e-12


def test_a_host_whose_steps_are_not_its_tableau_is_caught_by_the_replay_check():
    """A host that solves with classical RK4 but declares the 3/8 rule would get a wrong gradient: refused."""

    class Mislabelled(_ToyHost):
        def solve(self, y0, t):
            self.tableau = RK4_CLASSICAL
            solution, trajectory = super().solve(y0, t)
            self.tableau = RK4_38
            return solution, trajectory

    torch.manual_seed(0)
    field = _Field().double()
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    solution = odeint_symplectic(Mislabelled(RK4_38, field, 4), y0, t, list(field.parameters()))
    # The replay of the 3/8 rule does not reproduce the classical steps: caught by the replay check.
    with pytest.raises(RuntimeError, match="did not reproduce the forward pass"):
        solution.sum().backward()


def test_the_sweep_evaluates_only_the_stages_the_plan_needs():
    torch.manual_seed(0)
    field = _Field().double()
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    solution = odeint_symplectic(_ToyHost(DOPRI5, field, 2), y0, t, list(field.parameters()))
    assert field.calls == 2 * 7
    field.calls = 0
    solution[-1].sum().backward()
    # Per step: k_1..k_5 recomputed for later stage inputs (5), then VJPs of stages 1..6 (6); stage 7 never.
    assert field.calls == 2 * (5 + 6)


# --------------------------------------------------------------------------------------------------------
# HostSolver's contract

def test_host_solver_cannot_be_instantiated_without_its_abstract_methods():
    with pytest.raises(TypeError, match="abstract"):
        HostSolver()

    class NoDenseOutput(HostSolver):
        def solve(self, y0, t): ...

        def stage_calls(self, trajectory, n): ...

        def vector_field(self, t, y, kwargs): ...

    with pytest.raises(TypeError, match="dense_output"):
        NoDenseOutput()


def test_a_dense_output_that_does_not_stack_its_times_is_refused_naming_the_contract():
    """``dense_output`` gets all of a step's output times at once and must return their values stacked."""

    class Unstacked(_ToyHost):
        def dense_output(self, trajectory, n, y0, y1, k, t_out):
            return y1  # one value, as if t_out were a single time

    field = _Field().double()
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    solution = odeint_symplectic(Unstacked(EULER, field, 2), y0, torch.tensor([0.0, 1.0], dtype=F64),
                                 list(field.parameters()))
    with pytest.raises(TypeError, match=r"Unstacked.dense_output returned shape \(2, 3\) for 1 output time.*"
                                        r"stacked, shape \(1, 2, 3\)"):
        solution.sum().backward()


def test_host_solver_defaults_are_all_slots_all_entries_dt_times_tableau_and_no_modules():
    host = _ToyHost(RK4_38, _Field().double(), 1)
    assert host.returned_slots is None
    assert host.checked_entries == slice(None)
    assert tuple(host.modules()) == ()
    states = [torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)]
    dt = torch.tensor([0.1], dtype=torch.float32)  # a host time dtype other than the state's
    trajectory = Trajectory(states, torch.zeros(1), dt, dt, [None], {})
    ha, hb = host.step_coefficients(trajectory, 0)
    a, b = RK4_38.tensors(F64, torch.device("cpu"))
    assert ha.dtype == hb.dtype == F64
    assert torch.equal(ha, dt[0].double() * a) and torch.equal(hb, dt[0].double() * b)


# --------------------------------------------------------------------------------------------------------
# core.replay

def test_rng_state_restored_replays_the_draw_and_puts_the_generator_back():
    torch.manual_seed(1)
    state = RngState.capture(torch.device("cpu"))
    first = torch.randn(5)
    before_block = torch.get_rng_state()
    with state.restored():
        replayed = torch.randn(5)
    assert torch.equal(replayed, first)
    assert torch.equal(torch.get_rng_state(), before_block)
    assert not torch.equal(torch.randn(5), first)


def test_rng_state_restored_puts_the_generator_back_after_an_exception():
    state = RngState.capture(torch.device("cpu"))
    torch.randn(3)
    before_block = torch.get_rng_state()
    with pytest.raises(KeyError), state.restored():
        raise KeyError("inside")
    assert torch.equal(torch.get_rng_state(), before_block)


def test_randomness_watch_returns_none_for_a_deterministic_function():
    watch = RandomnessWatch(torch.device("cpu"))
    x = torch.arange(3.0)
    out, state = watch.call(torch.mul, x, 2.0)
    assert torch.equal(out, 2 * x) and state is None


def test_randomness_watch_returns_the_state_before_a_call_that_draws():
    watch = RandomnessWatch(torch.device("cpu"))
    before = torch.get_rng_state()
    out, state = watch.call(torch.nn.functional.dropout, torch.ones(100), p=0.5, training=True)
    assert state is not None and torch.equal(state.cpu, before)
    with state.restored():
        again = torch.nn.functional.dropout(torch.ones(100), p=0.5, training=True)
    assert torch.equal(again, out)


def _grad(p: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad((3 * p).sum(), p)[0]


def test_hooks_suspended_suspends_and_restores_parameter_hooks():
    hooked = torch.ones(2, requires_grad=True)
    hooked.register_hook(lambda g: 2 * g)
    plain = torch.ones(2, requires_grad=True)
    hooks = hooked._backward_hooks
    assert torch.equal(_grad(hooked), torch.full((2,), 6.0))
    with hooks_suspended([hooked, plain]):
        assert torch.equal(_grad(hooked), torch.full((2,), 3.0))
        assert plain._backward_hooks is None
    assert hooked._backward_hooks is hooks
    assert torch.equal(_grad(hooked), torch.full((2,), 6.0))
    assert plain._backward_hooks is None and torch.equal(_grad(plain), torch.full((2,), 3.0))


def test_hooks_suspended_restores_hooks_after_an_exception():
    hooked = torch.ones(2, requires_grad=True)
    hooked.register_hook(lambda g: 2 * g)
    with pytest.raises(KeyError), hooks_suspended([hooked]):
        raise KeyError("inside")
    assert torch.equal(_grad(hooked), torch.full((2,), 6.0))


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu")


def test_autocast_state_captured_under_cpu_bf16_is_entered_again_later():
    outside = AutocastState.capture()
    assert outside.enabled == () and not outside.needs_entering()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = AutocastState.capture()
    assert inside.enabled == (("cpu", torch.bfloat16),) and inside.needs_entering()
    x = torch.randn(4, 4)
    assert (x @ x).dtype == torch.float32
    with inside.entered():
        assert _autocast_on() and (x @ x).dtype == torch.bfloat16
    assert not _autocast_on()


def test_autocast_state_captured_off_turns_the_callers_autocast_off():
    outside = AutocastState.capture()
    x = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert outside.needs_entering()  # off when captured, on now
        with outside.entered():
            assert not _autocast_on() and (x @ x).dtype == torch.float32
        assert _autocast_on()


def _replayed_step(perturbation: float) -> ReplayCheck:
    torch.manual_seed(0)
    check = ReplayCheck(like=torch.zeros(6, dtype=F64), num_stages=2)
    hb = torch.tensor([0.05, 0.05], dtype=F64)
    for n in range(2):
        y0, k = torch.randn(6, dtype=F64), torch.randn(2, 6, dtype=F64)
        y1 = y0 + hb[0] * k[0] + hb[1] * k[1]  # not the same order of operations as the check's: rounding differs
        if n == 1:
            y1 = y1 + perturbation
        check.begin_step(n, y0, hb)
        for i in reversed(range(2)):  # the sweep's order
            check.add_stage(i, k[i], hb[i])
        check.end_step(n, y1)
    return check


def test_replay_check_passes_a_replay_that_reproduces_the_step():
    _replayed_step(0.0).raise_if_failed()


def test_replay_check_raises_for_a_replay_that_does_not_reproduce_the_step():
    with pytest.raises(RuntimeError, match="replay of step 1 did not reproduce the forward pass"):
        _replayed_step(1e-6).raise_if_failed()
    with pytest.raises(RuntimeError, match=r"Buffers updated in place during the solve: Foo\.bar\."):
        _replayed_step(1e-6).raise_if_failed(["Foo.bar"])


# --------------------------------------------------------------------------------------------------------
# The engine call (core/_engine.py)

def test_the_installed_torch_has_the_engine_entry_point_the_sweep_calls():
    # If a torch release renames it, the sweep silently falls back to torch.autograd.grad (correct, ~40 us slower
    # per stage): this test says so, so that the private name can be updated in core/_engine.py.
    from symadj_plugins.core import _engine
    assert _engine.ENGINE_ENTRY_POINT


def _mlp_graph(dtype=F64):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    unused = torch.nn.Parameter(torch.ones(2, dtype=dtype))
    y = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    return net(y), y, (*net.parameters(), unused)


@pytest.mark.parametrize("as_edge", [False, True])
def test_engine_vjp_equals_autograd_grad_with_unused_inputs_as_none(as_edge):
    from symadj_plugins.core._engine import vjp
    out, y, params = _mlp_graph()
    cotangent = torch.randn_like(out)
    expected = torch.autograd.grad(out, (y, *params), cotangent, retain_graph=True, allow_unused=True)
    output = torch.autograd.graph.get_gradient_edge(out) if as_edge else out
    got = vjp((output,), (cotangent,), (y, *params))
    assert got[-1] is None and expected[-1] is None
    for g, e in zip(got[:-1], expected[:-1]):
        assert torch.equal(g, e)


def test_engine_vjp_casts_a_cotangent_of_another_dtype_as_autograd_grad_does():
    from symadj_plugins.core._engine import vjp
    out, y, params = _mlp_graph(torch.float32)
    cotangent = torch.randn(out.shape, dtype=F64)
    expected = torch.autograd.grad(out, (y, *params), cotangent, retain_graph=True, allow_unused=True)
    got = vjp((out,), (cotangent,), (y, *params))
    assert all(g.dtype == torch.float32 and torch.equal(g, e) for g, e in zip(got[:-1], expected[:-1]))


def test_engine_vjp_hands_tensor_subclasses_to_autograd_grad(monkeypatch):
    from symadj_plugins.core import _engine

    class Tagged(torch.Tensor):
        pass

    out, y, params = _mlp_graph()
    calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real_grad(*a, **k))
    _engine.vjp((out,), (torch.ones_like(out),), (y.as_subclass(Tagged), *params), retain_graph=True)
    assert calls  # a subclass may override grad (__torch_function__): through torch.autograd.grad
    calls.clear()
    _engine.vjp((out,), (torch.ones_like(out),), (y, *params))
    assert not calls  # plain tensors: the engine directly
