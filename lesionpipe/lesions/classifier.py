"""Small models that turn a candidate's features into the probability of a GEL.

The hard rules of :mod:`lesionpipe.lesions.detect` remove what cannot be a lesion (too small, too
large, outside or at the surface of the brain). Among the rest, lesions and their mimics (vessels,
choroid plexus, dural folds, noise) differ by degrees in many features at once, and in
combinations (a bright candidate is suspect on a post-only scan, not after subtraction). Two model
kinds read the same physically meaningful features (mm, %, unit-free ratios; never intensities in
scanner units or positions in the image):

- ``logistic``: an L2-penalised logistic model;
- ``trees``: gradient-boosted shallow decision trees (the kind shipped now), trained with
  scikit-learn by ``scripts/train_classifier.py`` and evaluated here with numpy alone;
  ``--monotone`` holds each feature of :data:`MONOTONE` to its physical direction.

A model file names the features it reads, so a model trained on fewer features still loads.

Models ship as JSON (``lesionpipe/data/gel_classifier.json``); nothing is pickled or downloaded.
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
    "peak_pct": lambda d: d["peak_pct"].clip(upper=150.0),
    "thickness_mm": lambda d: d["thickness_mm"].clip(upper=20.0),
    "max_depth_mm": lambda d: d["max_depth_mm"].clip(upper=25.0),
    # mean level of the candidate and of its shell on the reference image (pre, or post alone)
    "ref_mean": lambda d: d["ref_mean"].clip(0.0, 250.0),
    "shell_ref_mean": lambda d: d["shell_ref_mean"].clip(0.0, 250.0),
    "attached": lambda d: d["attached"].astype(float) if "attached" in d else np.zeros(len(d)),
    # surroundings at half the candidate's peak (lesionpipe.lesions.detect.surround_features):
    # a piece of a vessel or fold goes on beyond itself, a lesion stands alone
    "shell_bright": lambda d: d["shell_bright"],
    "ring_bright": lambda d: d["ring_bright"],
    "shell_exits": lambda d: d["shell_exits"].clip(upper=6),
    "ring_p90": lambda d: d["ring_p90"].clip(-1.0, 2.0),
}


#: the direction each feature may move a candidate's probability, whatever the training data
#: say (+1: more of it is more lesion-like, -1: less, absent: free). Vessels are long, thin and
#: part of a larger enhancing tree; choroid plexus sits in the ventricles; dura, sinus and cortical
#: veins at or outside the surface, in CSF; a lesion is a compact blob in white matter that is not
#: dark before contrast. Constraining the boosted trees to these directions keeps the model from
#: learning a phantom's accidents (a step in the probability that no anatomy explains).
MONOTONE = {
    "log_elongation": -1, "log_flatness": -1, "log_tubularity": -1, "blobness": +1,
    "log_parent_ratio": -1, "shell_csf": -1, "shell_outside": -1, "ventricle_frac": -1,
    "shell_wm": +1, "pre_level": +1, "thickness_mm": +1, "attached": -1,
    "shell_bright": -1, "ring_bright": -1, "shell_exits": -1, "ring_p90": -1,
}


def feature_names(names=None) -> tuple[str, ...]:
    """``names`` as a tuple, or every feature of :data:`FEATURES` when None."""
    return tuple(FEATURES) if names is None else tuple(names)


def feature_matrix(table: pd.DataFrame, names=None) -> np.ndarray:
    """Features of each candidate as columns (``names``: a subset, in that order); NaN -> 0."""
    names = feature_names(names)
    columns = []
    for n in names:
        try:
            columns.append(np.asarray(FEATURES[n](table), float))
        except KeyError as err:    # a candidate table written by an older lesionpipe
            raise ValueError(f"classifier feature {n!r} needs the candidate table column "
                             f"{err.args[0]!r}, which this table does not have (written before "
                             "that feature existed? re-run the detection)") from None
    x = np.column_stack(columns)
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


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
        x = (feature_matrix(table, self.names) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(x @ self.coef + self.intercept)))

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({
            "kind": "logistic", "features": list(self.names), "mean": self.mean.tolist(),
            "scale": self.scale.tolist(), "coef": self.coef.tolist(),
            "intercept": self.intercept, "info": self.info}, indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "LogisticModel":
        data = json.loads(Path(path).read_text())
        _check_features(data["features"], path)
        return cls(mean=np.array(data["mean"]), scale=np.array(data["scale"]),
                   coef=np.array(data["coef"]), intercept=float(data["intercept"]),
                   names=tuple(data["features"]), info=data.get("info", {}))


def _check_features(names, path) -> None:
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ValueError(f"{path}: classifier features {unknown} are not computed by this version "
                         f"of lesionpipe (known: {list(FEATURES)}); retrain it")


@dataclass
class TreeModel:
    """Gradient-boosted regression trees on the log-odds scale (binary log-loss).

    Each tree is stored as flat arrays (scikit-learn's layout): ``feature[node]`` (-2 at a leaf),
    ``threshold[node]`` (go left when ``x <= threshold``), ``left``/``right`` children and the
    leaf ``value``. The log-odds is ``init + rate * sum(tree values)``.

    >>> t = {"feature": [0, -2, -2], "threshold": [1.5, 0, 0], "left": [1, -1, -1],
    ...      "right": [2, -1, -1], "value": [0, -2.0, 2.0]}
    >>> m = TreeModel(names=("log_volume",), init=0.0, rate=1.0, trees=[t], info={})
    >>> np.round(m.log_odds(np.array([[1.0], [2.0]])), 1).tolist()
    [-2.0, 2.0]
    """
    names: tuple[str, ...]
    init: float
    rate: float
    trees: list
    info: dict
    #: precision of the feature comparisons: scikit-learn's GradientBoostingClassifier compares
    #: float32 features, its HistGradientBoostingClassifier float64
    dtype: str = "float32"

    def __post_init__(self):
        self._arrays = [tuple(np.asarray(t[k]) for k in
                              ("feature", "threshold", "left", "right", "value"))
                        for t in self.trees]

    def log_odds(self, x: np.ndarray) -> np.ndarray:
        # compare at the precision the trees were trained with
        x = np.asarray(x, self.dtype)
        out = np.full(len(x), float(self.init))
        rows = np.arange(len(x))
        for feature, threshold, left, right, value in self._arrays:
            node = np.zeros(len(x), int)
            while True:
                f = feature[node]
                inner = f >= 0
                if not inner.any():
                    break
                go_left = x[rows[inner], f[inner]] <= threshold[node[inner]]
                node[inner] = np.where(go_left, left[node[inner]], right[node[inner]])
            out += self.rate * value[node]
        return out

    def probability(self, table: pd.DataFrame) -> np.ndarray:
        if len(table) == 0:
            return np.zeros(0)
        return 1.0 / (1.0 + np.exp(-self.log_odds(feature_matrix(table, self.names))))

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({
            "kind": "trees", "features": list(self.names), "init": self.init, "rate": self.rate,
            "dtype": self.dtype, "info": self.info, "trees": self.trees},
            separators=(",", ":")) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "TreeModel":
        data = json.loads(Path(path).read_text())
        _check_features(data["features"], path)
        return cls(names=tuple(data["features"]), init=float(data["init"]),
                   rate=float(data["rate"]), trees=data["trees"], info=data.get("info", {}),
                   dtype=data.get("dtype", "float32"))


def train_trees(table: pd.DataFrame, labels: np.ndarray, *, n_trees: int = 300, depth: int = 3,
                rate: float = 0.05, min_leaf: int = 20, seed: int = 0, monotone: bool = False,
                info: dict | None = None, names=None) -> TreeModel:
    """Fit the boosted trees with scikit-learn (needed for training only) and export them.

    ``names``: the features to read (default: all of :data:`FEATURES`). ``monotone``: constrain
    each feature of :data:`MONOTONE` to its direction (scikit-learn's histogram boosting, which
    supports the constraints; the plain boosting otherwise).
    """
    names = feature_names(names)
    x = feature_matrix(table, names)
    y = np.asarray(labels, int)
    meta = {**(info or {}), "n_trees": n_trees, "depth": depth, "min_leaf": min_leaf}
    if monotone:
        from sklearn.ensemble import HistGradientBoostingClassifier

        cst = [MONOTONE.get(n, 0) for n in names]
        clf = HistGradientBoostingClassifier(max_iter=n_trees, max_depth=depth, learning_rate=rate,
                                             min_samples_leaf=min_leaf, early_stopping=False,
                                             l2_regularization=1.0, monotonic_cst=cst,
                                             random_state=seed).fit(x, y)
        # leaf values already carry the learning rate; features compared as float64
        trees = [_hist_tree(pred.nodes) for (pred,) in clf._predictors]
        init, rate_out, dtype = float(np.ravel(clf._baseline_prediction)[0]), 1.0, "float64"
        meta["monotone"] = {n: c for n, c in zip(names, cst) if c}
    else:
        clf, trees = _fit_plain(x, y, n_trees=n_trees, depth=depth, rate=rate,
                                min_leaf=min_leaf, seed=seed)
        prior = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
        init, rate_out, dtype = float(np.log(prior / (1 - prior))), rate, "float32"
    model = TreeModel(names=names, init=init, rate=rate_out, trees=trees, info=meta, dtype=dtype)
    _check_export(model, clf, x[:200])
    return model


def _fit_plain(x, y, *, n_trees, depth, rate, min_leaf, seed, init=None):
    """scikit-learn's plain gradient boosting as the shipped models are fitted; its trees in
    :class:`TreeModel`'s layout (leaf values without the learning rate)."""
    from sklearn.ensemble import GradientBoostingClassifier

    clf = GradientBoostingClassifier(n_estimators=n_trees, max_depth=depth, learning_rate=rate,
                                     min_samples_leaf=min_leaf, subsample=0.8,
                                     random_state=seed, init=init).fit(x, y)
    return clf, [_plain_tree(est.tree_) for est in clf.estimators_[:, 0]]


def _check_export(model: TreeModel, clf, x: np.ndarray, where=None) -> None:
    """The exported model must reproduce scikit-learn's own decision function (on ``where``)."""
    where = slice(None) if where is None else where
    if not np.allclose(model.log_odds(x)[where], clf.decision_function(x)[where], atol=1e-3):
        raise RuntimeError("exported trees disagree with scikit-learn's decision function")


def continue_trees(base: TreeModel, table: pd.DataFrame, labels: np.ndarray, *,
                   n_trees: int = 100, depth: int = 3, rate: float | None = None,
                   min_leaf: int = 20, seed: int = 0, info: dict | None = None,
                   extra_names=()) -> TreeModel:
    """``base`` boosted further on new candidates (e.g. scans of another kind of anatomy).

    The new trees start from ``base``'s log-odds, so they learn only what ``base`` gets wrong on
    the new data, and the result is one :class:`TreeModel`: ``base``'s trees followed by the new
    ones. ``base`` must be a plain (not monotone) trees model. The new trees read its features and
    ``extra_names``, features it did not read, appended after its own (so its trees, which address
    features by position, are unchanged).
    """
    from sklearn.base import BaseEstimator, ClassifierMixin

    if base.dtype != "float32":
        raise ValueError("continue_trees: the base model must be plain boosted trees (float32)")
    rate = base.rate if rate is None else rate

    class _Base(ClassifierMixin, BaseEstimator):   # base's log-odds as the starting point
        def fit(self, x, y, sample_weight=None):
            self.classes_ = np.array([0, 1])
            return self

        def predict_proba(self, x):
            p = 1.0 / (1.0 + np.exp(-base.log_odds(x)))
            return np.column_stack([1.0 - p, p])

    extra = tuple(n for n in feature_names(extra_names) if n not in base.names)
    names = tuple(base.names) + extra
    x = feature_matrix(table, names)
    y = np.asarray(labels, int)
    clf, new = _fit_plain(x, y, n_trees=n_trees, depth=depth, rate=rate, min_leaf=min_leaf,
                          seed=seed, init=_Base())
    scale = rate / base.rate        # the model has one rate: the new leaves carry the ratio
    for tree in new:
        tree["value"] = [round(v * scale, 6) for v in tree["value"]]
    stage = {**(info or {}), "n_trees": n_trees, "depth": depth, "rate": rate,
             "min_leaf": min_leaf, "extra_features": list(extra)}
    # each continuation keeps the record of those before it: "continued" is the first,
    # "continued_2" the second, ...
    key, k = "continued", 1
    while key in base.info:
        k += 1
        key = f"continued_{k}"
    meta = {**base.info, key: stage}
    model = TreeModel(names=names, init=base.init, rate=base.rate, trees=base.trees + new,
                      info=meta, dtype=base.dtype)
    # scikit-learn clips the starting probability at float32's eps: compare where it does not
    _check_export(model, clf, x[:500], where=np.abs(base.log_odds(x[:500])) < 15.0)
    return model


def _plain_tree(t) -> dict:
    """One scikit-learn ``Tree`` (GradientBoostingClassifier) in :class:`TreeModel`'s layout."""
    return {"feature": t.feature.tolist(), "threshold": [float(v) for v in t.threshold],
            "left": t.children_left.tolist(), "right": t.children_right.tolist(),
            "value": [round(float(v), 6) for v in t.value[:, 0, 0]]}


def _hist_tree(nodes) -> dict:
    """One HistGradientBoostingClassifier predictor's node array in the same layout."""
    leaf = nodes["is_leaf"].astype(bool)
    return {"feature": np.where(leaf, -2, nodes["feature_idx"]).tolist(),
            "threshold": [float(v) for v in nodes["num_threshold"]],
            "left": np.where(leaf, -1, nodes["left"]).tolist(),
            "right": np.where(leaf, -1, nodes["right"]).tolist(),
            "value": [float(v) for v in nodes["value"]]}


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
          weight_positive: float = 1.0, info: dict | None = None, names=None) -> LogisticModel:
    names = feature_names(names)
    x = feature_matrix(table, names)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    coef, intercept = fit_logistic((x - mean) / scale, np.asarray(labels, float), l2=l2,
                                   weight_positive=weight_positive)
    return LogisticModel(mean=mean, scale=scale, coef=coef, intercept=intercept,
                         names=names, info=info or {})


_CACHE: dict[str, "LogisticModel | TreeModel"] = {}


def load_model(path: str | Path | None = None) -> "LogisticModel | TreeModel | None":
    """The shipped model (or ``path``); None when no model file exists (rules only)."""
    path = Path(path) if path else DEFAULT_MODEL
    if not path.exists():
        return None
    key = str(path.resolve())
    if key not in _CACHE:
        kind = json.loads(path.read_text()).get("kind", "logistic")
        _CACHE[key] = (TreeModel if kind == "trees" else LogisticModel).from_json(path)
    return _CACHE[key]
