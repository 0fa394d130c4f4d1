"""Soak of `phenotyper serve`: latency, errors and memory under a long stream of mixed traffic.

Trains a small champion into a throwaway store, starts the real scoring server, and sends the
request mix of tests/scoring/test_soak.py (good patients, batches of 1-50, implausible and odd
cells, missing markers, every predict parameter, malformed bodies) from several threads. Per
window of requests (in completion order) it reports latency p50/p95/p99 of good and of malformed
requests, answers by HTTP status, wrong answers (rows lost, reordered, a 5xx, no answer) and
throughput; a sampler thread records the RSS of the server's processes (MLflow's launcher and
its uvicorn worker) once a second, so a leak shows as RSS that keeps rising from window to
window. Writes benchmarks/results/soak.json.

    .venv/bin/python benchmarks/soak.py [--requests 5000] [--threads 4] [--window 500]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from results_file import code_version, write_results  # benchmarks/ is on sys.path when run

from phenotyper.runs.train import train
from phenotyper.serving import running_server
from phenotyper.training.spec import ExperimentSpec

# the traffic mix and its checks are the soak test's, so test and benchmark send the same
sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "scoring"))
from test_soak import Answer, make_case, patient_pool, problem, send

SAMPLE_EVERY_S = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per request")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        train(ExperimentSpec(name="soak", registered_model="immunophenotyper",
                             label="phenotype_true", preset="provide", n=2000, cohort_seed=6,
                             candidates={"logistic": {"C": [1.0]}}, bootstrap=30,
                             noise_repeats=0))
        rng = random.Random(args.seed)
        pool = patient_pool()
        cases = [make_case(i, pool, rng) for i in range(args.requests)]
        with running_server(cwd=Path(folder)) as url:
            server_pids = _server_processes(int(url.rsplit(":", 1)[1]))
            sampler = RssSampler(server_pids[0])
            sampler.start()
            start = time.monotonic()
            answers = _send_all(url, cases, args.threads, args.timeout_s)
            took_s = time.monotonic() - start
            final = send(url, make_case(args.requests, pool, random.Random(0)), timeout_s=10)
            sampler.stop()
    result = _summarise(args, answers, start, took_s, sampler.samples)
    result["final_request_ok"] = final.status is not None and not problem(final)
    write_results("soak", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("windows", "rss_series")},
                     indent=2))
    for window in result["windows"]:
        print(f"window {window['window']:>2}: good p50/p95/p99 {window['good_p50_ms']:>6} "
              f"{window['good_p95_ms']:>6} {window['good_p99_ms']:>6} ms, bad p50/p99 "
              f"{window['bad_p50_ms']:>5} {window['bad_p99_ms']:>5} ms, "
              f"{window['requests_per_s']:>5} req/s, rss {window['rss_mib_at_end']} MiB, "
              f"wrong {window['wrong']}")


def _send_all(url: str, cases: list, threads: int, timeout_s: float) -> list[Answer]:
    """Each thread takes the next case until none is left; the answers in completion order."""
    answers: list[Answer] = []
    lock = threading.Lock()
    position = iter(range(len(cases)))

    def worker() -> None:
        while True:
            with lock:
                index = next(position, None)
            if index is None:
                return
            answer = send(url, cases[index], timeout_s=timeout_s)
            with lock:
                answers.append(answer)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return sorted(answers, key=lambda a: a.ended_s)


def _summarise(args: argparse.Namespace, answers: list[Answer], start: float, took_s: float,
               samples: list[tuple[float, float]]) -> dict[str, Any]:
    """Per-window and overall figures (milliseconds, MiB, requests per second)."""
    wrong = Counter(p.split(":")[0] for p in map(problem, answers) if p)
    windows = []
    previous_end = start
    for number, first in enumerate(range(0, len(answers), args.window), 1):
        chunk = answers[first: first + args.window]
        end = chunk[-1].ended_s
        rss_then = [rss for t, rss in samples if t <= end]
        windows.append({
            "window": number, "requests": len(chunk),
            **_percentiles("good", [a for a in chunk if a.case.ids is not None]),
            **_percentiles("bad", [a for a in chunk if a.case.ids is None]),
            "by_status": _by_status(chunk),
            "wrong": sum(1 for a in chunk if problem(a)),
            "requests_per_s": round(len(chunk) / (end - previous_end), 1),
            "rss_mib_at_end": rss_then[-1] if rss_then else None,
        })
        previous_end = end
    rss = [value for _, value in samples]
    step = max(1, len(samples) // 200)
    first_problems = [f"{a.case.kind}: {p}" for a in answers if (p := problem(a))][:10]
    return {
        "requests": args.requests, "threads": args.threads, "window": args.window,
        "timeout_s": args.timeout_s, "seed": args.seed,
        "rows_sent": sum(len(a.case.ids) for a in answers if a.case.ids is not None),
        "good_requests": sum(1 for a in answers if a.case.ids is not None),
        "malformed_requests": sum(1 for a in answers if a.case.ids is None),
        "kinds": dict(Counter(a.case.kind for a in answers)),
        "by_status": _by_status(answers),
        "wrong_answers": sum(wrong.values()), "wrong_by_kind": dict(wrong),
        "first_wrong": first_problems,
        "soak_s": round(took_s, 1),
        "requests_per_s": round(len(answers) / took_s, 1),
        **_percentiles("good", [a for a in answers if a.case.ids is not None]),
        **_percentiles("bad", [a for a in answers if a.case.ids is None]),
        "rss_mib_start": rss[0] if rss else None, "rss_mib_end": rss[-1] if rss else None,
        "rss_mib_max": max(rss) if rss else None,
        "windows": windows,
        "rss_series": [{"t_s": round(t - start, 1), "rss_mib": value}
                       for t, value in samples[::step]],
        "code_version": code_version(),
    }


def _percentiles(name: str, answers: list[Answer]) -> dict[str, float | None]:
    latency_ms = [1000 * a.latency_s for a in answers]
    return {f"{name}_p{q}_ms": round(float(np.percentile(latency_ms, q)), 1) if latency_ms
            else None for q in (50, 95, 99)}


def _by_status(answers: list[Answer]) -> dict[str, int]:
    return dict(sorted(Counter(str(a.status or "no answer") for a in answers).items()))


def _server_processes(port: int) -> list[int]:
    """The server's process ids, its root first: the processes started with `--port PORT` (the
    launcher and uvicorn) whose parent is not one of them comes first."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a == b"--port" and b == str(port).encode() for a, b in itertools.pairwise(argv)):
                found.append(int(entry.name))
    roots = [pid for pid in found if _parent(pid) not in found]
    if len(roots) != 1:
        raise RuntimeError(f"cannot tell the server's process on port {port}: {found}")
    return roots + [pid for pid in found if pid not in roots]


def _parent(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def tree_rss_mib(root: int) -> float:
    """Resident memory of a process and all its descendants (VmRSS from /proc), MiB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            children.setdefault(_parent(int(entry.name)), []).append(int(entry.name))
    total_kib, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            status = (Path("/proc") / str(pid) / "status").read_text()
        except OSError:
            continue
        total_kib += next((int(line.split()[1]) for line in status.splitlines()
                           if line.startswith("VmRSS:")), 0)
    return round(total_kib / 1024, 1)


class RssSampler(threading.Thread):
    """Samples tree_rss_mib(root) every SAMPLE_EVERY_S seconds into `samples` (monotonic
    time, MiB) until stop()."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.samples = root, []
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            self.samples.append((time.monotonic(), tree_rss_mib(self.root)))
            self._stopped.wait(SAMPLE_EVERY_S)

    def stop(self) -> None:
        self._stopped.set()
        self.join()
        self.samples.append((time.monotonic(), tree_rss_mib(self.root)))


if __name__ == "__main__":
    main()
