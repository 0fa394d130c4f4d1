"""Start `phenotyper serve` (MLflow's scoring server) for a while, and talk to it over HTTP.

Used by the tests, the serving benchmark and `make demo`; a person runs `phenotyper serve`.

    python -m phenotyper.serving [--model URI]   # serve, score one patient, print, stop
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from phenotyper.contract import DEFAULT_MODEL_URI


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_service(command: list[str], health_url: str, cwd: Path | None = None,
                    env: dict[str, str] | None = None, timeout_s: float = 120.0) -> Iterator[None]:
    """Start a server process, wait until `health_url` answers 200, and stop it (its whole
    process group) when the block ends."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(health_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"{command[0]} stopped: "
                                       + process.stderr.read().decode()[-1500:]) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{command[0]} did not answer in {timeout_s} s") from None
                time.sleep(0.3)
        yield
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        if process.stderr is not None:
            process.stderr.close()


@contextmanager
def running_server(model: str = DEFAULT_MODEL_URI, cwd: Path | None = None,
                   timeout_s: float = 120.0) -> Iterator[str]:
    """`phenotyper serve` on a free loopback port; yields its URL and stops it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "phenotyper"), "serve", "--model", model,
               "--port", str(port)]
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    with running_service(command, f"{url}/ping", cwd=cwd, env=env, timeout_s=timeout_s):
        yield url


def post(url: str, body: bytes, timeout_s: float = 30.0) -> tuple[int, dict[str, Any]]:
    """POST a JSON body to /invocations; the HTTP status and the decoded answer."""
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def score(url: str, records: list[dict[str, Any]], **params: str) -> list[dict[str, Any]]:
    """Scored rows for patient records (dicts of panel columns), in order; `params` are the
    model's predict parameters (explain, rejected_values)."""
    payload: dict[str, Any] = {"dataframe_records": records}
    if params:
        payload["params"] = params
    status, answer = post(url, json.dumps(payload).encode())
    if status != 200:
        raise RuntimeError(f"scoring server answered {status}: {answer.get('message')}")
    return answer["predictions"]


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a model, score one patient, stop.")
    parser.add_argument("--model", default=DEFAULT_MODEL_URI)
    args = parser.parse_args()
    patient = {"patient_id": "demo-1", "ferritin_ng_ml": 6100.0, "hla_dr_mab_per_cell": 7400.0,
               "platelets_10e9_l": 62.0, "fibrinogen_g_l": 1.9, "ast_u_l": 240.0,
               "triglycerides_mg_dl": 310.0, "il6_pg_ml": 1400.0, "crp_mg_l": 210.0,
               "lymphocytes_10e9_l": 0.6, "sofa": 12.0, "age_years": 67.0, "sex": "M"}
    with running_server(args.model) as url:
        [row] = score(url, [patient])
    print(f"Served {args.model} at {url}/invocations. Patient {row['patient_id']} "
          "(a synthetic example):")
    print(f"  phenotype {row['phenotype']} (P = {row['prob_' + row['phenotype']]:.2f}); "
          f"ImmunoSep rule: {row['rule_phenotype']}; status {row['status']}")
    print(f"  top drivers (logit contributions): {row['top_drivers']}")


if __name__ == "__main__":
    main()
