"""A small logistic model that turns a candidate's features into the probability of a GEL.

The hard rules of :mod:`lesionpipe.lesions.detect` remove what cannot be a lesion (too small, too
large, outside or at the surface of the brain). Among the rest, lesions and their mimics (vessels,
choroid plexus, dural folds, noise) differ by degrees in many features at once; a logistic model
weighs them together. It is deliberately small (a dozen standardised, physically meaningful
features, L2-penalised) so that it cannot memorise the phantoms it was trained on. It ships as
JSON (``lesionpipe/data/gel_classifier.json``) and is rebuilt by ``scripts/train_classifier.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "gel_classifier.json"

#: feature name -> how it is derived from the candidate table (all unit-free or in mm / %)
FEATURES = {
    "log_volume": lambda d: np.log(d["volume_mm3"].clip(lower=1.0)),
    "contrast_z": lambda d: d["contrast_z"].clip(upper=40.0),
    "mean_pct": lambda d: d["mean_pct"].clip(upper=150.0),
    "local_contrast_pct": lambda d: d["local_contrast_pct"].clip(upper=150.0),
    "log_elongation": lambda d: np.log(d["elongation"].clip(lower=1.0)),
    "log_flatness": lambda d: np.log(d["flatness"].clip(lower=1.0)),
    "log_tubularity": lambda d: np.log(d["tubularity"].clip(lower=0.1)),
    "blobness": lambda d: d["blobness"],
    "log_parent_ratio": lambda d: np.log(d["parent_ratio"].clip(lower=1.0)),
    "depth_mm": lambda d: d["depth_mm"].clip(upper=20.0),
    "shell_csf": lambda d: d["shell_csf"],
    "shell_outside": lambda d: d["shell_outside"],
    "ventricle_frac": lambda d: d["ventricle_frac"],
    "shell_wm": lambda d: d["shell_wm"],
    "pre_level": lambda d: np.where(d["has_pre"].astype(bool), d["ref_mean"].clip(0, 150), 0.0),
    "has_pre": lambda d: d["has_pre"].astype(float),
    "slice_mm": lambda d: d["slice_mm"],
}


def feature_matrix(table: pd.DataFrame) -> np.ndarray:
    return np.column_stack([np.asarray(f(table), float) for f in FEATURES.values()])


@dataclass
class LogisticModel:
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    names: tuple[str, ...]
    info: dict

    def probability(self, table: pd.DataFrame) -> np.ndarray:
        if len(table) == 0:
            return np.zeros(0)
        x = (feature_matrix(table) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(x @ self.coef + self.intercept)))

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({
            "features": list(self.names), "mean": self.mean.tolist(),
            "scale": self.scale.tolist(), "coef": self.coef.tolist(),
            "intercept": self.intercept, "info": self.info}, indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "LogisticModel":
        data = json.loads(Path(path).read_text())
        if tuple(data["features"]) != tuple(FEATURES):
            raise ValueError(f"{path}: classifier features {data['features']} do not match this "
                             f"version of lesionpipe ({list(FEATURES)}); retrain it")
        return cls(mean=np.array(data["mean"]), scale=np.array(data["scale"]),
                   coef=np.array(data["coef"]), intercept=float(data["intercept"]),
                   names=tuple(data["features"]), info=data.get("info", {}))


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1.0, weight_positive: float = 1.0,
                 iterations: int = 100) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression by Newton's method on standardised features.

    >>> rng = np.random.default_rng(0); x = rng.normal(size=(400, 2))
    >>> y = (x[:, 0] + 0.2 * rng.normal(size=400) > 0).astype(float)
    >>> coef, b = fit_logistic(x, y, l2=0.1)
    >>> bool(coef[0] > 3 * abs(coef[1]))
    True
    """
    n, p = x.shape
    w = np.where(y > 0.5, weight_positive, 1.0)
    beta = np.zeros(p + 1)
    xa = np.column_stack([x, np.ones(n)])
    penalty = np.diag([l2] * p + [0.0])
    for _ in range(iterations):
        eta = np.clip(xa @ beta, -30, 30)
        mu = 1.0 / (1.0 + np.exp(-eta))
        grad = xa.T @ (w * (y - mu)) - penalty @ beta
        hess = (xa * (w * mu * (1 - mu))[:, None]).T @ xa + penalty
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.abs(step).max() < 1e-8:
            break
    return beta[:p], float(beta[p])


def train(table: pd.DataFrame, labels: np.ndarray, *, l2: float = 1.0,
          weight_positive: float = 1.0, info: dict | None = None) -> LogisticModel:
    x = feature_matrix(table)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    coef, intercept = fit_logistic((x - mean) / scale, np.asarray(labels, float), l2=l2,
                                   weight_positive=weight_positive)
    return LogisticModel(mean=mean, scale=scale, coef=coef, intercept=intercept,
                         names=tuple(FEATURES), info=info or {})


_CACHE: dict[str, LogisticModel] = {}


def load_model(path: str | Path | None = None) -> LogisticModel | None:
    """The shipped model (or ``path``); None when no model file exists (rules only)."""
    path = Path(path) if path else DEFAULT_MODEL
    if not path.exists():
        return None
    key = str(path.resolve())
    if key not in _CACHE:
        _CACHE[key] = LogisticModel.from_json(path)
    return _CACHE[key]
