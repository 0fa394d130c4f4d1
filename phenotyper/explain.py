"""Exact SHAP for XGBoost models: the documented names, kept where users import them from.
The engine is `phenotyper.treeshap`; the figures are `phenotyper.plots.shap`."""

from phenotyper.treeshap import (
    FallbackWarning,
    TreeShapTables,
    UnsupportedBooster,
    XGBoostContributions,
    kernel_cache_dir,
    shap_values,
    tree_explainer,
)

__all__ = ["FallbackWarning", "TreeShapTables", "UnsupportedBooster", "XGBoostContributions",
           "kernel_cache_dir", "shap_values", "tree_explainer"]
