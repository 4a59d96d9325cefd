"""``python -m symadj_plugins.bench``: run the gradient-method benchmark and write tables, JSON and plots.

Examples::

    python -m symadj_plugins.bench --quick                      # < 1 min: tiny CNF, every method
    python -m symadj_plugins.bench --problem cnf steps          # two problems
    python -m symadj_plugins.bench --problem budget             # time vs memory across memory_budget
    python -m symadj_plugins.bench --problem all --out bench_out
    python -m symadj_plugins.bench --problem steps --methods backprop,ours-torchdiffeq
    python -m symadj_plugins.bench --problem cnf steps --report-only   # tables/plots from saved JSON
    python -m symadj_plugins.bench --problem all --results docs/results  # also the files the docs render from
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import figures, report, targets
from .memory import CPU_METHOD, CUDA_METHOD
from .methods import DEFAULT_METHODS, METHODS, SWEEP_METHODS
from .problems import PROBLEMS, case_key, cases
from .records import load_results, save_results

TIMING_METHOD = ("wall time (time.perf_counter, CUDA synchronised) of forward (solve + loss) and backward "
                 "(torch.autograd.grad w.r.t. the parameters), median of --repeats runs after one warm-up run")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m symadj_plugins.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", nargs="+", default=["cnf"], metavar="NAME",
                   help=f"problems to run: {', '.join(PROBLEMS)} or all (default: cnf)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: each problem's own list); all = every method. "
                        f"Known: {', '.join(METHODS)}")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, one timing repeat, all methods in one process per case (< 1 min on 2 cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="bench_out", help="output folder for results JSON, markdown and PNGs")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method after warm-up (default 3; "
                                                             "quick: 1)")
    p.add_argument("--isolate", choices=["method", "case"], default=None,
                   help="a fresh process per method (default) or per case (default with --quick; always for the "
                        "budget problem, whose methods are timed round-robin)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads in the workers (default 1: ratios stay meaningful on a shared "
                        "machine, where idle-waiting intra-op threads make multi-threaded timings erratic; "
                        "0 = torch's default)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rebuild tables and plots from OUT/<problem>.json")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="also write each problem's results file as DIR/<problem>.json (docs/results: what the "
                        "documentation's tables and figures are rendered from, by python -m "
                        "symadj_plugins.bench.render)")
    args = p.parse_args(argv)
    if "all" in args.problem:
        args.problem = list(PROBLEMS)
    for name in args.problem:
        if name not in PROBLEMS:
            p.error(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)} or all")
    if args.methods is not None:
        names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in names if m not in METHODS]
        if unknown:
            p.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
        args.methods = names
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.isolate is None:
        args.isolate = "case" if args.quick else "method"
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            p.error("--device cuda: CUDA is not available")
    return args


BENCH_EXTRA = "pip install -e '.[bench]'"


def missing_dependencies(args: argparse.Namespace) -> list[str]:
    """The optional packages (the ``bench`` extra) this run needs but cannot import, checked before any work."""
    needed = [name for name, used in (("matplotlib", not args.no_plots), ("tqdm", not args.report_only)) if used]
    missing = []
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def interleaved(case: dict) -> bool:
    """Whether the case's methods run in one process, timed round-robin (the ``budget`` problem: its times are
    ratios to backprop per repeat, which need backprop's repeats next to each method's)."""
    return case["problem"] == "budget"


def plan(args: argparse.Namespace) -> list[tuple[dict, list[str]]]:
    """``(case, methods)`` per worker process, in the order they run."""
    jobs = []
    for problem in args.problem:
        for case in cases(problem, args.quick):
            chosen = args.methods or DEFAULT_METHODS[problem]
            if case.get("role") == "sweep":
                chosen = [m for m in chosen if m in SWEEP_METHODS]
            # Backprop first: the others are compared with its gradient.
            chosen = sorted(chosen, key=lambda m: list(METHODS).index(m))
            if not chosen:
                continue
            if args.isolate == "case" or interleaved(case):
                jobs.append((case, chosen))
            else:
                jobs.append((case, []))  # the float64 reference gradient, cached for the others
                jobs += [(case, [m]) for m in chosen]
    return jobs


def machine_info(device: str) -> dict:
    import torch

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torchdiffeq": version("torchdiffeq"), "torchdyn": version("torchdyn"),
            "symadj_plugins": version("symadj-plugins"), "device": device}
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _isolation(args: argparse.Namespace) -> str:
    text = f"a fresh process per {args.isolate}"
    if "budget" in args.problem:
        text += " (budget: one process per case, its methods timed round-robin)"
    return text


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_job(case: dict, methods: list[str], args, cache: Path, logs: Path) -> list[dict]:
    spec = {"case": case, "methods": methods, "repeats": args.repeats, "device": args.device,
            "cache_dir": str(cache), "threads": args.threads or None, "interleave": interleaved(case)}
    name = f"{case['problem']}-{case_key(case)}-{'+'.join(methods) or 'reference'}"
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, TORCH_CPP_LOG_LEVEL="ERROR", PYTHONWARNINGS="ignore")
        log_path = logs / f"{name}.log"
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run([sys.executable, "-m", "symadj_plugins.bench.worker", str(spec_path),
                                       str(out_path)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                      timeout=args.timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if code == 0 and out_path.exists():
            return json.loads(out_path.read_text())
    tail = log_path.read_text()[-800:].strip().splitlines()
    reason = f"worker failed ({code}): {tail[-1] if tail else ''}; log: {log_path}"
    base = {"problem": case["problem"], "case": case, "case_key": case_key(case), "label": case.get("label")}
    return [dict(base, method=m, method_label=METHODS[m].label, family=METHODS[m].family, status="error",
                 reason=reason) for m in methods]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_dependencies(args)
    if missing:
        print(f"error: the benchmark needs matplotlib and tqdm (not importable here: {', '.join(missing)}): "
              f"{BENCH_EXTRA} in a clone of symadj-plugins, or pip install matplotlib tqdm", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m symadj_plugins.bench " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

    if args.report_only:
        records, meta = [], {}
        for problem in args.problem:
            path = out / f"{problem}.json"
            if path.exists():
                saved = load_results(path)
                records += saved.records
                meta[problem] = saved.meta
        if not records:
            print(f"no saved results for {', '.join(args.problem)} in {out}", file=sys.stderr)
            return 1
        if args.results:
            for problem, problem_meta in meta.items():
                save_results(Path(args.results) / f"{problem}.json", problem_meta,
                             [r for r in records if r.get("problem") == problem])
        first = next(iter(meta.values()))
        same_run = all(m.get("command") == first.get("command") for m in meta.values())
        header = dict(first, rebuilt_by=command) if same_run else {"runs": meta, "command": command}
        return _finish(records, args, out, header)

    from tqdm.auto import tqdm

    cache, logs = out / "cache", out / "logs"
    cache.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    meta = {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(args.device), "load_average_start": _load_avg(),
            "memory_method": CUDA_METHOD if args.device == "cuda" else CPU_METHOD, "timing_method": TIMING_METHOD,
            "isolation": _isolation(args), "repeats": args.repeats, "quick": args.quick}
    jobs = plan(args)
    records: list[dict] = []
    start = time.time()
    # A progress bar only on a terminal: in CI logs and pipes it is noise.
    with tqdm(total=len(jobs), unit="job", file=sys.stderr, dynamic_ncols=True, disable=not sys.stderr.isatty()) as bar:
        for case, methods in jobs:
            bar.set_description(f"{case['problem']} {case.get('label', '')}: {', '.join(methods) or 'reference'}")
            got = run_job(case, methods, args, cache, logs)
            records += [r for r in got if r.get("method") != "reference" or r.get("status") != "ok"]
            for r in got:
                if r.get("status") == "error":
                    bar.write(f"  {r['method']} on {case['problem']} {case.get('label')}: {r.get('reason')}",
                              file=sys.stderr)
            bar.update(1)
    meta["elapsed_s"] = round(time.time() - start, 1)
    meta["load_average_end"] = _load_avg()
    for problem in args.problem:
        recs = [r for r in records if r.get("problem") == problem]
        save_results(out / f"{problem}.json", meta, recs)
        if args.results:
            print(f"wrote {save_results(Path(args.results) / f'{problem}.json', meta, recs)}", file=sys.stderr)
    return _finish(records, args, out, meta)


def _finish(records: list[dict], args, out: Path, meta: dict) -> int:
    text = report.markdown(records, args.problem)
    header = _meta_lines(meta)
    print(header + "\n" + text)
    (out / "results.md").write_text(header + "\n" + text)
    result = {"meta": meta, "records": records, "targets": targets.targets(records)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if not args.no_plots:
        for path in figures.plots(records, out):
            print(f"wrote {path}", file=sys.stderr)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)
    return 0


def _meta_lines(meta: dict) -> str:
    if "machine" not in meta:
        return f"Command: `{meta.get('command')}` (report rebuilt from the results of several runs)\n"
    m = meta["machine"]
    cpu = m.get("cpu_model", m.get("processor"))
    return "\n".join([
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; elapsed {meta.get('elapsed_s')} s  ",
        f"Machine: {cpu}, {m['cpu_count']} CPUs, {m['platform']}; device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "") + "  ",
        f"Load average at start / end: {meta.get('load_average_start')} / {meta.get('load_average_end')}  ",
        f"Versions: torch {m['torch']}, torchdiffeq {m['torchdiffeq']}, torchdyn {m['torchdyn']}, "
        f"python {m['python']}  ",
        f"Memory: {meta['memory_method']}; {meta['isolation']}  ",
        f"Time: {meta['timing_method']}" + ("  " if meta.get("rebuilt_by") else ""),
        *([f"(Tables rebuilt from the saved results by `{meta['rebuilt_by']}`.)"] if meta.get("rebuilt_by") else []),
        "",
    ])
