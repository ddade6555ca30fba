"""2-D maps of well embeddings for the report: PCA, or UMAP when umap-learn happens to be installed
(it is not a dependency). Features are z-scored per dimension first, so no single dimension's scale
decides the map."""

from __future__ import annotations

import importlib.util

import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler


def resolve_method(method: str) -> str:
    """auto -> umap when importable, else pca."""
    if method == "auto":
        return "umap" if importlib.util.find_spec("umap") is not None else "pca"
    return method


def embedding_map(features: np.ndarray, method: str, seed: int = 0) -> dict:
    """{"method", "xy": (n, 2) list} for the wells in `features` (n, D); deterministic for a seed."""
    method = resolve_method(method)
    scaled = StandardScaler().fit_transform(np.asarray(features, dtype=np.float64))
    if method == "umap":
        import umap

        xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(scaled)
        extra: dict = {}
    else:
        n_components = min(2, *scaled.shape)
        pca = PCA(n_components=n_components, svd_solver="full").fit(scaled)
        xy = np.zeros((len(scaled), 2))
        xy[:, :n_components] = pca.transform(scaled)
        extra = {"explained_variance_ratio": [round(float(v), 4) for v in pca.explained_variance_ratio_]}
    return {"method": method, "xy": np.round(xy, 5).tolist(), **extra}
