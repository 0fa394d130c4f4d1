"""One evaluator for every phenotyper: weighted metrics, the patient bootstrap, robustness to
re-measurement, outcomes and treatment policies, and the benchmark that runs them all."""

from phenotyper.evaluate.benchmark import Benchmark, benchmark
from phenotyper.evaluate.metrics import EvaluationError

__all__ = ["Benchmark", "EvaluationError", "benchmark"]
