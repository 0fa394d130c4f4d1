"""What a scoring run tells its reader, gathered block by block without keeping rows."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phenotyper.contract import INDETERMINATE, NOT_SCORED, SCORED_KINDS
from phenotyper.panel import PATIENT_ID, SITE_ID
from phenotyper.scoring.checks import ISSUES, ROW

PROBABILITY_BINS = 20
EXAMPLES = 20  # unscored rows listed in the manifest and report
AGREEMENT_EXAMPLES = 5  # example rows per model-vs-rule cell


# --- summary: what the manifest and report say about the whole output -------------------------


@dataclass
class ScoreSummary:
    """Counts accumulated block by block, so a summary of any size costs flat memory."""

    classes: list[str]
    features: list[str]
    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    phenotypes: Counter = field(default_factory=Counter)
    rule: Counter = field(default_factory=Counter)
    agreement: Counter = field(default_factory=Counter)  # (rule, model) -> rows
    agreement_rows: dict = field(default_factory=dict)  # (rule, model) -> first row numbers
    sites: dict = field(default_factory=dict)  # site -> Counter of phenotypes
    histograms: dict = field(default_factory=dict)  # class -> counts per probability bin
    shap_abs_sum: np.ndarray | None = None
    explained: int = 0
    unscored_examples: list = field(default_factory=list)
    issue_rows: int = 0

    def add(self, out: pa.Table, status_kind: np.ndarray) -> None:
        """Count one block of output (ScoredBlock.table): every tally a whole column at a
        time, names kept in the order they first appear (the order the counts are listed)."""
        self.rows += len(out)
        kinds, kind_names = _codes(pa.array(status_kind, pa.string()))
        _tally(self.by_status, kind_names, kinds)
        model, model_names = _codes(out["phenotype"], NOT_SCORED)
        rule, rule_names = _codes(out["rule_phenotype"], INDETERMINATE)
        _tally(self.phenotypes, model_names, model)
        _tally(self.rule, rule_names, rule)
        row = out[ROW].to_numpy()
        pair = rule * len(model_names) + model
        _, first = np.unique(pair, return_index=True)
        for code in pair[np.sort(first)]:  # pairs in the order they first appear
            key = (rule_names[code // len(model_names)], model_names[code % len(model_names)])
            where = np.flatnonzero(pair == code)
            self.agreement[key] += len(where)
            known = self.agreement_rows.setdefault(key, [])
            known.extend(row[where[:max(AGREEMENT_EXAMPLES - len(known), 0)]].tolist())
        site, site_names = _codes(out[SITE_ID], "(no site)")
        by_site = np.bincount(site * len(model_names) + model,
                              minlength=len(site_names) * len(model_names))
        for site_name, model_name, count in sorted(
                (site_names[code // len(model_names)], model_names[code % len(model_names)],
                 count) for code, count in enumerate(by_site.tolist()) if count):
            self.sites.setdefault(site_name, Counter())[model_name] += count
        scored = np.isin(status_kind, list(SCORED_KINDS))
        edges = np.linspace(0, 1, PROBABILITY_BINS + 1)
        for name in self.classes:
            counts, _ = np.histogram(out[f"prob_{name}"].to_numpy()[scored], bins=edges)
            self.histograms[name] = self.histograms.get(name, 0) + counts
        shap_columns = [f"shap_{name}" for name in self.features]
        if all(column in out.column_names for column in shap_columns):
            values = np.abs(np.column_stack([out[column].to_numpy() for column in shap_columns]
                                            )[scored])
            values = values[np.isfinite(values).all(axis=1)]
            total = values.sum(axis=0)
            self.shap_abs_sum = total if self.shap_abs_sum is None else self.shap_abs_sum + total
            self.explained += len(values)
        if len(self.unscored_examples) < EXAMPLES and not scored.all():
            rows = out.select([ROW, PATIENT_ID, "status"]).take(
                np.flatnonzero(~scored)[:EXAMPLES - len(self.unscored_examples)])
            self.unscored_examples += [
                {"row": r, "patient_id": p, "status": s} for r, p, s in zip(
                    *(rows[name].to_pylist() for name in rows.column_names), strict=True)]
        self.issue_rows += len(out) - (pc.sum(pc.equal(out[ISSUES], "")).as_py() or 0)

    def phenotype_shares(self) -> dict[str, float]:
        """Each phenotype's share of the rows the model scored."""
        scored = sum(self.phenotypes.get(name, 0) for name in self.classes)
        return {name: self.phenotypes.get(name, 0) / scored if scored else 0.0
                for name in self.classes}

    def mean_abs_shap(self) -> dict[str, float]:
        """Mean |contribution| to the predicted class's logit per feature, largest first."""
        if self.shap_abs_sum is None or not self.explained:
            return {}
        means = self.shap_abs_sum / self.explained
        order = np.argsort(-means)
        return {self.features[i]: float(means[i]) for i in order}

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the manifest (JSON)."""
        return {
            "rows_by_status": dict(self.by_status.most_common()),
            "phenotype_counts": dict(self.phenotypes.most_common()),
            "rule_phenotype_counts": dict(self.rule.most_common()),
            "model_vs_rule": [{"rule": r, "model": m, "rows": n,
                               "example_rows": self.agreement_rows[(r, m)]}
                              for (r, m), n in sorted(self.agreement.items())],
            "rows_with_issues": self.issue_rows,
            "by_site": {site: dict(counts) for site, counts in sorted(self.sites.items())},
            "probability_histograms": {
                "bin_edges": np.linspace(0, 1, PROBABILITY_BINS + 1).round(6).tolist(),
                **{name: np.asarray(counts).tolist() for name, counts in self.histograms.items()}},
            "unscored_examples": self.unscored_examples,
            "mean_abs_shap": self.mean_abs_shap(),
        }


def _codes(values: pa.Array | pa.ChunkedArray, missing: str | None = None
           ) -> tuple[np.ndarray, list[str]]:
    """Each cell's code and the distinct texts in the order they first appear; a missing
    cell counts as the text `missing`."""
    if missing is not None:
        values = pc.fill_null(values, missing)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    encoded = pc.dictionary_encode(values)
    return (encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64),
            encoded.dictionary.to_pylist())


def _tally(counter: Counter, names: list[str], codes: np.ndarray) -> None:
    """Add the count of each code to `counter` under its name, in the names' order."""
    counter.update(dict(zip(names, np.bincount(codes, minlength=len(names)).tolist(),
                            strict=True)))
