"""A bouncing ball with events, differentiated by the symplectic adjoint (after torchdiffeq's
``examples/bouncing_ball.py``).

The ball falls under gravity until its height reaches its radius (an event, found by
``torchdiffeq.odeint_event``), bounces with some of its speed absorbed, and falls again. Every bounce is one
``odeint_event`` call whose ``odeint_interface`` is :func:`symadj_plugins.torchdiffeq.odeint_symplectic_adjoint`,
and the time of one bounce is the start of the next, so the gradient of the last bounce time w.r.t. the
initial height and velocity, the start time, gravity, radius and absorption runs through every bounce.

The script prints the bounce times and that gradient, and checks it against backprop through the same
accepted steps (``torchdiffeq.odeint`` with each bounce's first step fixed): the relative error is rounding.

    python examples/bouncing_ball.py                 # 3 bounces, writes bench_out/examples/bouncing_ball.png
    python examples/bouncing_ball.py --nbounces 10 --out ball.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchdiffeq

from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint, supported_methods

# Adaptive methods only (the gradient check fixes each bounce's first step, which fixed grids do not have), and
# those whose dense output locates the bounces well here (torchdiffeq's bosh3 puts the first one at 1.01 s, not
# at sqrt(2) s; the symplectic adjoint reproduces that too, bit for bit).
ADAPTIVE = [m for m in ("dopri5", "dopri8") if m in supported_methods()]


class BouncingBall(torch.nn.Module):
    """State ``(height, velocity, log_radius)``, each of shape ``(1,)``; lengths in m, time in s."""

    def __init__(self, radius: float = 0.2, gravity: float = 9.8, absorption: float = 0.2):
        super().__init__()
        self.gravity = torch.nn.Parameter(torch.tensor([gravity]))        # m/s²
        self.log_radius = torch.nn.Parameter(torch.tensor([radius]).log())
        self.t0 = torch.nn.Parameter(torch.tensor([0.0]))                 # s
        self.init_pos = torch.nn.Parameter(torch.tensor([10.0]))          # m
        self.init_vel = torch.nn.Parameter(torch.tensor([0.0]))           # m/s
        self.absorption = torch.nn.Parameter(torch.tensor([absorption]))  # fraction of speed lost per bounce
        self.first_steps: list[float] = []  # each bounce's first step, recorded when `recording`
        self.recording = False

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        pos, vel, log_radius = state
        return vel, -self.gravity.expand_as(vel), torch.zeros_like(log_radius)

    def callback_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        if self.recording:
            self.first_steps.append(float(dt))
            self.recording = False

    @staticmethod
    def event_fn(t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Positive while the ball is in the air, negative once it touches the ground."""
        pos, _, log_radius = state
        return pos - log_radius.exp()

    def bounce(self, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        pos, vel, log_radius = state
        # Lift the ball a hair above the ground so the next solve does not stop at once.
        return pos + 1e-7, -vel * (1 - self.absorption), log_radius

    def bounce_times(self, nbounces: int, odeint_interface, first_steps: list[float] | None = None,
                     **kwargs) -> list[torch.Tensor]:
        """The times of the first ``nbounces`` bounces (each a ``(1,)`` tensor). With ``first_steps``, bounce
        ``i``'s solve starts with step ``first_steps[i]``; without, each first step is recorded."""
        t0, state = self.t0, (self.init_pos, self.init_vel, self.log_radius)
        times = []
        if first_steps is None:
            self.first_steps = []
        for i in range(nbounces):
            options = None if first_steps is None else {"first_step": first_steps[i]}
            self.recording = first_steps is None
            event_t, solution = torchdiffeq.odeint_event(self, state, t0, event_fn=self.event_fn,
                                                         odeint_interface=odeint_interface, options=options,
                                                         **kwargs)
            times.append(event_t)
            state = self.bounce(tuple(s[-1] for s in solution))
            t0 = event_t
        return times

    @torch.no_grad()
    def path(self, times: list[torch.Tensor], points_per_second: int = 50, **kwargs):
        """Height and velocity on a dense grid between the bounces, for the plot."""
        t0, state = self.t0, (self.init_pos, self.init_vel, self.log_radius)
        ts, heights, velocities = [t0.reshape(-1)], [state[0]], [state[1]]
        for event_t in times:
            n = max(3, int((float(event_t) - float(t0)) * points_per_second))
            tt = torch.linspace(float(t0), float(event_t), n, dtype=t0.dtype)
            solution = torchdiffeq.odeint(self, state, tt, **kwargs)
            ts.append(tt[1:])
            heights.append(solution[0][1:, 0])
            velocities.append(solution[1][1:, 0])
            state = self.bounce(tuple(s[-1] for s in solution))
            t0 = event_t
        return torch.cat(ts), torch.cat(heights), torch.cat(velocities)


def gradients(ball: BouncingBall, nbounces: int, odeint_interface, first_steps=None, **kwargs):
    """``d(last bounce time)/d(parameter)`` for every parameter, by name."""
    last = ball.bounce_times(nbounces, odeint_interface, first_steps=first_steps, **kwargs)[-1]
    names, params = zip(*ball.named_parameters())
    grads = torch.autograd.grad(last.sum(), params, allow_unused=True)
    return last.item(), {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nbounces", type=int, default=3, help="number of bounces (default: 3)")
    parser.add_argument("--method", default="dopri5", choices=ADAPTIVE, help="torchdiffeq method (default: dopri5)")
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--atol", type=float, default=1e-8)
    parser.add_argument("--out", metavar="PATH", default="bench_out/examples/bouncing_ball.png",
                        help="where to write the plot ('' for none)")
    args = parser.parse_args(argv)
    if args.nbounces < 1:
        parser.error("--nbounces must be at least 1")

    torch.set_default_dtype(torch.float64)  # float64: the gradient check compares to rounding
    ball = BouncingBall()
    kwargs = dict(rtol=args.rtol, atol=args.atol, method=args.method)

    last, ours = gradients(ball, args.nbounces, odeint_symplectic_adjoint, **kwargs)
    first_steps = list(ball.first_steps)
    # The reference: backprop through the same steps. Each bounce's first step is fixed, since
    # torchdiffeq.odeint would otherwise differentiate its choice of initial step.
    _, reference = gradients(ball, args.nbounces, torchdiffeq.odeint, first_steps=first_steps, **kwargs)

    with torch.no_grad():
        times = ball.bounce_times(args.nbounces, odeint_symplectic_adjoint, **kwargs)
    print("bounce times (s): " + ", ".join(f"{float(t):.6f}" for t in times))
    print(f"d(bounce {args.nbounces} time)/d(parameter), symplectic adjoint | backprop:")
    for name in ours:
        print(f"  {name:>10}: {ours[name].item(): .12e} | {reference[name].item(): .12e}")
    got = torch.cat([g.reshape(-1) for g in ours.values()])
    want = torch.cat([g.reshape(-1) for g in reference.values()])
    error = ((got - want).norm() / want.norm()).item()
    print(f"gradient of the last bounce time ({last:.6f} s): relative error {error:.3e} "
          "vs backprop through the same steps")

    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ts, heights, velocities = ball.path(times, **kwargs)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(ts.numpy(), heights.numpy(), color="C0", linewidth=2.0, label="height (m)")
        ax.plot(ts.numpy(), velocities.numpy(), color="C1", alpha=0.7, linestyle="--", linewidth=2.0,
                label="velocity (m/s)")
        ax.plot([float(t) for t in times], [0.0] * len(times), "o", color="C0", fillstyle="none", markersize=7,
                label="bounces")
        ax.axhline(0.0, color="k", linewidth=0.8)
        ax.set_xlim(float(ts[0]), float(ts[-1]))
        ax.set_xlabel("time (s)")
        ax.legend()
        fig.tight_layout()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
