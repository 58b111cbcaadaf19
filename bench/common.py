"""What every benchmark shares (shared/BENCHMARKS.md): interleaved timing with medians and paired ratios, an
allclose check before timing, peak memory in a subprocess, machine and version records, JSON + Markdown output."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


@dataclass
class Settings:
    """Command-line settings every benchmark takes."""

    quick: bool = False
    device: str = "cpu"
    threads: int = 2
    out: Path = RESULTS
    reps: int = 0  # 0: the benchmark's own default
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """Result-file tag: the device kind (cpu, h100, h200, ...) and `-quick` for quick runs."""
        return device_tag(self.device) + ("-quick" if self.quick else "")


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes (the suite adds --only)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (what tests run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", default="auto", help="torch CPU threads; auto: 2 (BENCHMARKS.md) on an idle "
                    "machine, 1 when other processes keep the cores busy (see `auto_threads`)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for bench-*.json / bench-*.md")
    ap.add_argument("--reps", type=int, default=0, help="timed rounds per case (0: the benchmark's own)")
    return ap


def settings(a: argparse.Namespace) -> Settings:
    threads = auto_threads() if a.threads == "auto" else int(a.threads)
    return Settings(quick=a.quick, device=a.device, threads=threads, out=a.out, reps=a.reps)


def parse_args(description: str, argv: list[str] | None = None) -> Settings:
    return settings(parser(description).parse_args(argv))


def auto_threads() -> int:
    """2 threads (BENCHMARKS.md) when the machine is idle (1-minute load average below 1), else 1: with other
    processes on the same 2 cores, every 2-thread op waits at OpenMP barriers for a descheduled thread (measured
    here: 10 matmuls [64x576]x[576x1536] took 60 ms on 1 thread and 330 ms on 2 at load 4.5), which distorts
    ratios between contenders with different op counts."""
    return 2 if os.getloadavg()[0] < 1.0 else 1


def setup(s: Settings) -> torch.device:
    """Threads, seed, fp32, and the device to run on."""
    torch.set_num_threads(s.threads)
    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    if s.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as on the CPU
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(s.device)


def device_tag(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    return next((k for k in ("h200", "h100", "a100", "l4", "a10") if k in name), "gpu")


def machine(s: Settings) -> dict[str, Any]:
    """Versions and machine, recorded in every JSON result."""
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_version,
            "python": platform.python_version(), "nproc": os.cpu_count(), "cpu": cpu, "threads": s.threads,
            "device": s.device, "dtype": "float32", "quick": s.quick, "load_avg": list(os.getloadavg())}
    if s.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(s.device))
    return info


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def interleave(contenders: dict[str, Callable[[], Any]], *, reps: int, warmup: int = 2,
               sync: Callable[[], None] = lambda: None, budget_s: float | None = None) -> dict[str, list[float]]:
    """Time each contender `reps` times, A B C A B C ... (order rotated every round), after `warmup` rounds.

    Returns seconds per call, per contender. Stops early (after at least 3 rounds) once `budget_s` is spent.
    """
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            contenders[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of t_a / t_b measured in the same round (robust to drifting machine load)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, *, rtol: float = 1e-4, atol: float = 1e-4) -> float:
    """Raise unless `got` ≈ `want`; returns the max abs difference (recorded in results)."""
    diff = (got.float() - want.float()).abs().max().item()
    if not torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol):
        raise AssertionError(f"{name}: contenders differ (max abs difference {diff:.3g}); not timing them")
    return diff


def peak_memory(module: str, args: dict[str, Any], device: str) -> dict[str, float]:
    """Peak memory of one contender, measured in a fresh subprocess: `python -m <module> --probe '<json>'`.

    The probe prints a JSON line {"rss_mib": ru_maxrss, "cuda_mib": max allocated} after running the case."""
    cmd = [sys.executable, "-m", module, "--probe", json.dumps({**args, "device": device})]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe_report(device: str) -> dict[str, float]:
    """What a probe subprocess prints at its end: its peak RSS and peak CUDA memory in MiB."""
    out = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        out["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def current_rss_mib() -> float:
    """Resident memory of this process now (Linux /proc/self/statm), MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def write(s: Settings, name: str, payload: dict[str, Any], table: list[dict[str, Any]], notes: list[str]) -> Path:
    """docs/results/bench-<name>-<tag>.json (everything) and .md (the table, the notes and the payload's goals)."""
    if payload.get("goals"):
        notes = [*notes, "", "Goals:", ""] + [f"- {g['goal']}: measured {g['measured']} -> "
                                              f"{'met' if g['met'] else 'MISSED'}" for g in payload["goals"]]
    s.out.mkdir(parents=True, exist_ok=True)
    stem = s.out / f"bench-{name}-{s.tag}"
    doc = {"benchmark": name, "machine": machine(s), "command": command(), **payload, "rows": table}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(name, doc["machine"], table, notes), encoding="utf-8")
    return stem.with_suffix(".json")


def command() -> str:
    """The command line that made a result (`python -m bench ...` or `python -m bench.<name> ...`)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name.removesuffix('.__main__')}" if spec is not None else "python"
    return " ".join([head, *sys.argv[1:]])


def markdown(name: str, info: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['nproc']} cores, {info['threads']} threads)"
    head = [f"# Benchmark: {name}", "", f"Measured on {where}; torch {info['torch']}, transformers "
            f"{info['transformers']}, peft {info['peft']}, fp32{', quick shapes' if info['quick'] else ''}. "
            f"Load average at the end: {', '.join(f'{x:.1f}' for x in info['load_avg'])}. Made by `{command()}`.",
            ""]
    if not rows:
        return "\n".join(head + notes) + "\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(head + lines + [""] + notes) + "\n"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)
