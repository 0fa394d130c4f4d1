"""The latent classes' marker profiles as a figure: each class's median marker against the
whole cohort's, the picture the classes were named from."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def profile_figure(profile: pd.DataFrame) -> Figure:
    """Heat map of log2(class median / median over classes, weighted by size) per marker.

    `profile`: one row per class with a `patients` column and one column of medians (panel
    units) per marker, as `LatentResult.profile`."""
    medians = profile.drop(columns="patients")
    size = profile["patients"].to_numpy(float)
    overall = (medians.mul(size, axis=0).sum() / size.sum()).replace(0, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log2(medians.to_numpy(float) / overall.to_numpy(float))
    figure = Figure(figsize=(1.0 + 0.45 * medians.shape[1], 2.6), layout="constrained")
    ax = figure.subplots()
    limit = float(np.nanmax(np.abs(ratio))) if np.isfinite(ratio).any() else 1.0
    image = ax.imshow(np.nan_to_num(ratio), cmap="RdBu_r", vmin=-limit, vmax=limit,
                      aspect="auto")
    ax.set_xticks(range(medians.shape[1]), medians.columns, rotation=70, ha="right",
                  fontsize=7)
    ax.set_yticks(range(len(profile)), [f"{name} (n={int(n)})" for name, n in
                                        zip(profile.index, size, strict=True)], fontsize=8)
    figure.colorbar(image, ax=ax, label="log2 median / overall")
    ax.set_title("Latent class profiles (median marker per class)", fontsize=9)
    return figure
