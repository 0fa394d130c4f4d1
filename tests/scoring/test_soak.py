"""A bounded soak of `phenotyper serve`: ~2000 mixed requests from several threads against the
real scoring server (good patients, batches, implausible and odd cells, missing markers, every
predict parameter, malformed bodies). No answer may be a 5xx or hang; a malformed body gets a 4xx
with a message; a good one gets one row per input row, in order. benchmarks/soak.py sends the
same mix for longer and measures latency and memory."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from phenotyper.simulate import simulate

pytestmark = pytest.mark.slow

REQUESTS = 2000
THREADS = 6
TIMEOUT_S = 30.0  # one request
SOAK_BUDGET_S = 90.0  # all requests; about 30 s on 2 busy cores
DROPPED = ["site_id", "phenotype_true", "phenotype_rule", "death_28d", "synthetic"]
MARKERS = ["ferritin_ng_ml", "hla_dr_mab_per_cell", "crp_mg_l", "il6_pg_ml", "platelets_10e9_l",
           "fibrinogen_g_l", "ast_u_l", "triglycerides_mg_dl", "lymphocytes_10e9_l", "sofa"]
# a cell the model cannot read -> what its row's status says
NOT_A_NUMBER = "is not a number"
ODD_CELLS: list[tuple[Any, str]] = [("lots", NOT_A_NUMBER), ("", ""), ("é中", NOT_A_NUMBER),
                                    ({"a": 1}, NOT_A_NUMBER), ([1, 2], NOT_A_NUMBER)]


@dataclass
class Case:
    """One request of the mix and what a correct answer is: `ids` (the patient_ids, in order)
    for a good request, None for a malformed one (a 4xx with a message). `flags` maps a row's
    position to the text its status must contain (a value the model must refuse or set aside)."""

    kind: str
    body: bytes
    ids: list[Any] | None
    flags: dict[int, str]
    explain: str = "predicted"


@dataclass
class Answer:
    """What came back for one case: HTTP status (None: no answer, `error` says why), the body,
    the time it took and when it ended (seconds on the monotonic clock)."""

    case: Case
    status: int | None
    body: bytes
    latency_s: float
    ended_s: float
    error: str = ""


def patient_pool(n: int = 400, seed: int = 9) -> list[dict[str, Any]]:
    """Synthetic patients as JSON records (the panel columns a hospital would send)."""
    cohort = simulate("provide", n, seed=seed).drop(columns=DROPPED)
    return json.loads(cohort.to_json(orient="records"))


def _body(records: list[dict[str, Any]], params: dict[str, str] | None = None) -> bytes:
    payload: dict[str, Any] = {"dataframe_records": records}
    if params:
        payload["params"] = params
    return json.dumps(payload).encode()


def make_case(index: int, pool: list[dict[str, Any]], rng: random.Random) -> Case:
    """The `index`-th request of the mix. Patient ids are unique per request (text or whole
    numbers) so an answer out of order or from another request shows."""
    kind = rng.choices(["single", "batch", "implausible", "odd", "missing", "extra_column",
                        "malformed"], weights=[25, 20, 12, 12, 10, 6, 15])[0]
    if kind == "malformed":
        return _malformed(index, pool, rng)
    size = 1 if kind == "single" else rng.randint(1, 50)
    records = [dict(p) for p in rng.sample(pool, size)]
    for row, record in enumerate(records):
        record["patient_id"] = index * 100 + row if rng.random() < 0.3 else f"r{index}-{row}"
    explain = rng.choice(["predicted", "none", "all", None])
    params = {"explain": explain} if explain else {}
    flags: dict[int, str] = {}
    row = rng.randrange(size)
    if kind == "implausible":
        column, value, shown = rng.choice([("crp_mg_l", 1410.0, "1410"),
                                           ("ferritin_ng_ml", -40.0, "-40"),
                                           ("platelets_10e9_l", 1e308, "1e+308")])
        records[row][column] = value
        if rng.random() < 0.5:
            params["rejected_values"] = "missing"
            flags[row] = f"scored without {column}={shown} is outside"
        else:
            flags[row] = f"{column}={shown} is outside"
    elif kind == "odd":
        column = rng.choice(MARKERS)
        value, said = rng.choice([*ODD_CELLS, (6100, ""), ("X", "")])
        if value == "X":
            column, said = "sex", "sex 'X' is not F or M"
        records[row][column] = value
        if said:
            flags[row] = said
    elif kind == "missing":
        for record in records:
            for column in rng.sample(MARKERS, rng.randint(1, len(MARKERS))):
                if rng.random() < 0.5:
                    record.pop(column)
                else:
                    record[column] = None
    elif kind == "extra_column":
        records[row]["not_a_panel_column"] = rng.choice([1, "x", None])
    return Case(kind, _body(records, params), [r["patient_id"] for r in records], flags,
                explain or "predicted")


def _malformed(index: int, pool: list[dict[str, Any]], rng: random.Random) -> Case:
    """A body the server must refuse with a 4xx and a message."""
    good = _body(rng.sample(pool, 2))
    body = rng.choice([
        good[: rng.randint(1, len(good) - 2)],  # cut short: invalid JSON
        b"", b"null", b"[1, 2, 3]", b'"hello"', b"42",
        b'{"records": []}',  # no input field MLflow knows
        b'{"dataframe_records": {"ferritin_ng_ml": 300}}',  # records not a list
        b'{"dataframe_records": [], "inputs": []}',  # two input fields
        _body(pool[:1], {"explain": "everything"}),
        _body(pool[:1], {"rejected_values": "ignore"}),
        json.dumps({"dataframe_records": pool[:1], "params": "all"}).encode(),
    ])
    return Case("malformed", body, None, {})


def send(url: str, case: Case, timeout_s: float = TIMEOUT_S) -> Answer:
    """POST one case to /invocations; an HTTP error is an answer, a timeout or a dropped
    connection is recorded as no answer (status None), never raised."""
    request = urllib.request.Request(f"{url}/invocations", data=case.body,
                                     headers={"Content-Type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, body, error = response.status, response.read(), ""
    except urllib.error.HTTPError as http_error:
        status, body, error = http_error.code, http_error.read(), ""
    except OSError as failure:  # URLError, TimeoutError, ConnectionResetError
        status, body, error = None, b"", repr(failure)
    end = time.monotonic()
    return Answer(case, status, body, end - start, end, error)


def problem(answer: Answer) -> str:
    """What is wrong with an answer ("" when nothing is)."""
    case = answer.case
    if answer.status is None:
        return f"no answer: {answer.error}"
    if answer.status >= 500:
        return f"{answer.status}: {answer.body[:300]!r}"
    try:
        decoded = json.loads(answer.body)
    except ValueError:
        return f"{answer.status} with a body that is not JSON: {answer.body[:200]!r}"
    if case.ids is None:
        if not 400 <= answer.status < 500:
            return f"malformed body answered {answer.status}: {case.body[:120]!r}"
        if not (isinstance(decoded, dict) and decoded.get("message")):
            return f"{answer.status} without a message: {answer.body[:200]!r}"
        return ""
    if answer.status != 200:
        return f"good request answered {answer.status}: {decoded.get('message', '')[:200]}"
    rows = decoded.get("predictions")
    if not isinstance(rows, list) or len(rows) != len(case.ids):
        count = len(rows) if isinstance(rows, list) else rows
        return f"{len(case.ids)} rows in, {count} out ({case.kind})"
    if [r.get("patient_id") for r in rows] != case.ids:
        return f"patient_ids out of order or changed ({case.kind})"
    for row, said in case.flags.items():
        if said not in str(rows[row].get("status")):
            return f"row {row} status {rows[row].get('status')!r}, expected {said!r}"
    shap = [k for k in rows[0] if k.startswith("shap_")]
    if (case.explain == "none") == bool(shap) or (
            case.explain == "all") != ("shap_base_unclassified" in rows[0]):
        return f"explain={case.explain} answered SHAP columns {shap[:3]}"
    return ""


def soak(url: str, cases: list[Case], threads: int, budget_s: float) -> tuple[list[Answer], int]:
    """Send `cases` from `threads` threads; a case not started within `budget_s` is skipped.
    The answers, in completion order, and how many cases were skipped."""
    deadline = time.monotonic() + budget_s

    def one(case: Case) -> Answer | None:
        return send(url, case) if time.monotonic() < deadline else None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        sent = list(pool.map(one, cases))
    answers = sorted((a for a in sent if a is not None), key=lambda a: a.ended_s)
    return answers, len(cases) - len(answers)


def test_mixed_concurrent_traffic_is_answered_correctly_and_the_server_stays_up(server) -> None:
    rng = random.Random(16)
    pool = patient_pool()
    cases = [make_case(i, pool, rng) for i in range(REQUESTS)]
    start = time.monotonic()
    answers, skipped = soak(server, cases, THREADS, SOAK_BUDGET_S)
    took_s = time.monotonic() - start
    problems = Counter(p for p in map(problem, answers) if p)
    assert not problems, problems.most_common(10)
    assert skipped == 0, f"{skipped} of {REQUESTS} requests not sent within {SOAK_BUDGET_S} s"
    assert took_s < SOAK_BUDGET_S + TIMEOUT_S
    kinds = Counter(a.case.kind for a in answers)
    assert min(kinds.values()) > REQUESTS // 50 and len(kinds) == 7  # the mix was mixed
    final = send(server, make_case(REQUESTS, pool, random.Random(0)), timeout_s=10)
    assert final.status is not None and not problem(final)
    with urllib.request.urlopen(f"{server}/ping", timeout=10) as response:
        assert response.status == 200


@pytest.mark.xfail(strict=True, reason="MLflow's schema enforcement drops every row when no "
                   "column is one the signature knows; the model is handed 0 rows")
def test_a_record_with_no_known_column_still_gets_its_row(server) -> None:
    """[{}] or [{"bogus": 1}]: one record in, so one row out (unscored or scored on nothing),
    not a 200 with no rows that a client would misalign."""
    for records in ([{}], [{"not_a_panel_column": 1}], [{}, {}]):
        answer = send(server, Case("empty", _body(records), [None] * len(records), {}))
        rows = json.loads(answer.body).get("predictions", [])
        assert answer.status == 200 and len(rows) == len(records), (records, answer.body[:200])
