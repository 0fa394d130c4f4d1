"""phenotyper: sepsis immune phenotypes from multi-marker lab data."""

__version__ = "0.1.0"
