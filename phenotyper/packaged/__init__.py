"""The packaged model: plain data plus the code that scores it, without scikit-learn."""

from phenotyper.packaged.model import PackagedPhenotyper

__all__ = ["PackagedPhenotyper"]
