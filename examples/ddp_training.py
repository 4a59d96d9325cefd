"""Train a small neural ODE with DistributedDataParallel on CPU processes, gradients by the symplectic adjoint.

Each process (gloo backend, 127.0.0.1 only) takes its share of every batch; DDP wraps the module whose forward
calls the solver (an ``ODEBlock``), so the parameters DDP synchronises are those the solve differentiates. The
task: learn the flow that rotates points of the plane by a quarter turn in unit time.

    python examples/ddp_training.py                              # 2 processes, torchdiffeq, 20 steps
    python examples/ddp_training.py --host torchdyn --steps 100  # torchdyn's NeuralODE instead

Prints each rank's loss every step, and at the end the largest parameter difference between the ranks (0.0:
DDP kept the replicas identical). ``tests/test_distributed.py`` runs it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import symadj_plugins


class Field(nn.Module):
    """``dx/dt = MLP(x)`` on states ``(batch, 2)``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, t, x, args=None):  # torchdyn passes ``args``
        return self.net(x)


class ODEBlock(nn.Module):
    """``forward(x)``: the state at ``t = 1`` of ``dx/dt = field(x)`` from ``x`` at ``t = 0``, shape of ``x``."""

    def __init__(self, field: nn.Module, host: str, method: str):
        super().__init__()
        self.host, self.method = host, method
        self.t = torch.tensor([0.0, 1.0])
        if host == "torchdyn":
            from torchdyn.core import NeuralODE

            self.ode = NeuralODE(field, sensitivity="symplectic_adjoint", solver=method, atol=1e-6, rtol=1e-4)
        else:
            self.ode = field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.t.to(x)
        if self.host == "torchdyn":
            return self.ode(x, t)[1][-1]
        import torchdiffeq  # after register(): adjoint_method="symplectic" is ours

        return torchdiffeq.odeint_adjoint(self.ode, x, t, method=self.method, rtol=1e-4, atol=1e-6,
                                          adjoint_method="symplectic")[-1]


def quarter_turn(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([-x[:, 1], x[:, 0]], dim=1)


def train(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)  # one core per process
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.processes, timeout=datetime.timedelta(seconds=120))
    symadj_plugins.register()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(rank)  # different on purpose: DDP broadcasts rank 0's parameters when it wraps the model
    model = DistributedDataParallel(ODEBlock(Field(args.hidden), args.host, args.method).to(dtype))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    share = args.batch_size // args.processes
    for step in range(args.steps):
        generator = torch.Generator().manual_seed(step)  # every rank draws the same batch, keeps its share
        x = torch.randn(args.batch_size, 2, generator=generator, dtype=dtype)[rank * share:(rank + 1) * share]
        loss = (model(x) - quarter_turn(x)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients over the ranks here
        optimizer.step()
        # One write per record (the ranks share stdout): print() writes the text and the newline separately.
        sys.stdout.write(f"rank {rank} step {step} loss {loss.item():.6f}\n")
        sys.stdout.flush()

    flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(args.processes)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        difference = max((g - gathered[0]).abs().max().item() for g in gathered)
        print(f"largest parameter difference between ranks {difference} "
              f"({'identical' if difference == 0 else 'NOT identical'})", flush=True)
    dist.barrier()  # both ranks are done communicating before either tears the group down
    dist.destroy_process_group()
    # With torch 2.13 on CPU, gloo's teardown aborted at interpreter exit in about 1 run in 10 here ("terminate called
    # without an active exception"), after all the work above was done. Leaving without running the C++ static
    # destructors avoids it; everything worth keeping has been printed and flushed.
    sys.stdout.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--processes", type=int, default=2, help="DDP processes on this machine (default 2)")
    parser.add_argument("--host", choices=["torchdiffeq", "torchdyn"], default="torchdiffeq",
                        help="which library solves the ODE")
    parser.add_argument("--method", default="dopri5", help="solver name in the host library (default dopri5)")
    parser.add_argument("--batch-size", type=int, default=64, help="whole batch, split over the processes")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    if args.processes < 1 or args.batch_size % args.processes:
        parser.error(f"--batch-size ({args.batch_size}) must be a positive multiple of --processes "
                     f"({args.processes}), so every rank gets an equal share")
    # Exceptions in a worker are re-raised here by mp.spawn.
    mp.spawn(train, args=(args, free_port()), nprocs=args.processes, join=True)
    print(f"done: {args.steps} steps on {args.processes} processes, {args.batch_size} samples a batch")


if __name__ == "__main__":
    main()
