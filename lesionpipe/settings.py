"""Every tunable of lesionpipe in one frozen object, read from and written to TOML.

The command line builds one :class:`Settings`; tests build it directly. A copy is written next to
each visit's outputs so that any count can be traced to the exact parameters that produced it.

Top-level keys are the image pipeline's; ``[analysis]`` holds the efficacy model's and ``[review]``
the central-reader application's.

>>> s = Settings()
>>> s.connectivity, s.min_voxels, s.min_volume_mm3
(26, 3, 10.0)
>>> Settings.from_toml_string(s.to_toml_string()) == s
True
>>> Settings.from_toml_string('min_voxels = 5').min_voxels
5
>>> Settings.from_toml_string('bogus = 1')
Traceback (most recent call last):
...
ValueError: unknown setting 'bogus' in settings TOML
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w


@dataclass(frozen=True)
class AnalysisSettings:
    """Efficacy model (``lesionpipe analyze``): visit windows and model choices (MESEMS defaults).

    See docs/analyze.md for what each choice does.
    """

    #: week of the baseline scan (its count is the baseline covariate)
    baseline_week: int = 0
    #: weeks whose counts are summed into the primary endpoint (period 1)
    period1_weeks: tuple[int, ...] = (4, 12, 24)
    #: weeks of the second crossover period (empty = no crossover analyses)
    period2_weeks: tuple[int, ...] = (28, 36, 48)
    #: arm label used as the reference; empty = the label containing "placebo"
    reference_arm: str = ""
    #: covariates from the design table added to the primary model (baseline GELs always are)
    covariates: tuple[str, ...] = ()
    #: baseline GEL count in the primary model: "linear" (the count), "log1p" (log(1+count)), "none"
    baseline_adjustment: str = "linear"
    #: offset log(number of available scans in the window)
    offset_scans: bool = True
    #: robust (HC1 sandwich) instead of model-based standard errors for the primary Wald CI/p
    robust_se: bool = False
    #: two-sided significance level for power and the "significant" flags (CIs are always 95%)
    alpha: float = 0.05
    #: Gauss-Hermite points for the crossover NB mixed model (1 = Laplace approximation)
    mixed_quadrature_points: int = 15

    def __post_init__(self) -> None:
        if self.baseline_adjustment not in ("linear", "log1p", "none"):
            raise ValueError("analysis.baseline_adjustment must be 'linear', 'log1p' or 'none', "
                             f"not {self.baseline_adjustment!r}")
        if not self.period1_weeks:
            raise ValueError("analysis.period1_weeks must list at least one week")
        weeks = [self.baseline_week, *self.period1_weeks, *self.period2_weeks]
        if len(set(weeks)) != len(weeks):
            raise ValueError("analysis visit windows overlap: baseline_week, period1_weeks and "
                             "period2_weeks must be distinct weeks")
        if not 0 < self.alpha < 1:
            raise ValueError("analysis.alpha must be between 0 and 1")
        if not 1 <= self.mixed_quadrature_points <= 50:
            raise ValueError("analysis.mixed_quadrature_points must be between 1 and 50")


@dataclass(frozen=True)
class ReviewSettings:
    """Central-reader review application."""

    #: "count": readers disagree when confirmed counts differ; "lesions": when lesion sets differ
    disagreement_rule: str = "lesions"
    readers_per_visit: int = 2
    #: centroid distance (mm) within which two readers' added lesions are the same lesion
    match_distance_mm: float = 3.0
    #: idle time after which a reader must log in again
    session_timeout_minutes: int = 240
    #: add-missed-lesion region growing on the enhancement map: voxels join above this fraction
    #: of the (snapped) seed's enhancement ...
    grow_fraction: float = 0.5
    #: ... and above this absolute enhancement (% over normal white matter) ...
    grow_min_enhancement_pct: float = 10.0
    #: ... within this distance of the seed (mm) ...
    grow_radius_mm: float = 10.0
    #: ... up to this many voxels
    grow_max_voxels: int = 2000

    def __post_init__(self) -> None:
        if self.disagreement_rule not in ("lesions", "count"):
            raise ValueError("review.disagreement_rule must be 'lesions' or 'count', "
                             f"not {self.disagreement_rule!r}")
        if self.readers_per_visit not in (1, 2):
            raise ValueError("review.readers_per_visit must be 1 or 2")
        if not 0 < self.grow_fraction <= 1:
            raise ValueError("review.grow_fraction must be in (0, 1]")
        if self.grow_max_voxels < 1 or self.grow_radius_mm <= 0:
            raise ValueError("review.grow_max_voxels and grow_radius_mm must be positive")


@dataclass(frozen=True)
class Settings:
    """Image pipeline tunables (top level) plus the analysis and review sections."""

    # --- counting rule -------------------------------------------------------------------
    #: 3-D neighbourhood defining one lesion: 6, 18 or 26
    connectivity: int = 26
    #: a GEL has at least this many voxels ...
    min_voxels: int = 3
    #: ... and at least this volume
    min_volume_mm3: float = 10.0

    # --- preprocessing -------------------------------------------------------------------
    #: run N4 bias-field correction
    bias_correct: bool = True
    #: N4 works on a copy shrunk by this factor (the field is smooth)
    n4_shrink: int = 4
    n4_iterations: tuple[int, ...] = (50, 50, 30)
    #: register pre to post (rigid, Mattes mutual information)
    register: bool = True
    registration_sampling: float = 0.05

    # --- detection -----------------------------------------------------------------------
    #: enhancement threshold, in robust standard deviations of the brain's subtraction map
    subtraction_z: float = 4.0
    #: post-only threshold, in robust standard deviations of normal-appearing white matter
    post_only_z: float = 4.0
    #: the enhancement map is smoothed (Gaussian, sigma in mm) before candidates are thresholded
    enhancement_smooth_mm: float = 0.7
    #: on thick-slice grids (thickest voxel side at least ``thick_slice_mm``) the high threshold is
    #: this many noise SDs when that is below ``subtraction_z`` / ``post_only_z`` (the smoothing
    #: cannot act across slices, so a lesion's peak stands less far above the noise)
    thick_slice_mm: float = 2.5
    thick_slice_z: float = 4.0
    #: give back, as candidates of their own, compact bright parts of an enhancing component that
    #: no peeled region took (a lesion on the flank of a brighter vessel); off by default, see
    #: docs/evaluation.md for what it did on a fresh seed
    recover_flanks: bool = False
    #: when a peak takes its half-maximum region, the watershed basins of the peaks it holds go
    #: with it only within this distance (mm) of the region (and wholly beyond a 20 mm window);
    #: what stays above the high threshold further out is peeled from its own brightest voxel. A
    #: lesion abutting a brighter vessel often has no maximum of its own and would otherwise leave
    #: with the vessel's flank. 0 = the whole basins go (as before; the shipped classifier was
    #: trained on those candidates), see docs/evaluation.md
    peel_flank_mm: float = 3.0
    #: minimum enhancement of a lesion's peak over normal-appearing white matter, percent
    min_peak_enhancement_pct: float = 15.0
    #: minimum mean enhancement of a candidate above its 2 mm surroundings, percent
    min_local_contrast_pct: float = 8.0
    #: ... and at least this many noise SDs of the enhancement map: fainter than that, a sizeable
    #: region is a plateau of residual bias or sequence contrast, not a lesion (0 = off)
    min_contrast_z: float = 2.5
    #: candidates whose centroid lies closer than this to the brain surface are rejected (mm)
    surface_margin_mm: float = 3.0
    #: candidates overlapping the dilated ventricles by more than this fraction are rejected
    max_ventricle_overlap: float = 0.3
    #: candidates larger than this are not lesions (global enhancement, misregistration)
    max_volume_mm3: float = 20000.0
    #: minimum share of a candidate's 2 mm surroundings that reads as white matter
    min_shell_wm: float = 0.5
    #: volume / inscribed-ball volume above which a candidate is a vessel segment
    max_tubularity: float = 2.8
    #: elongation (major/minor principal axis) above which a candidate is a vessel
    max_elongation: float = 2.8
    #: with the classifier, whatever it says: elongation above which a candidate is a vessel
    #: (no enhancing lesion reaches it; ovoid Dawson's fingers stay below ~3) ...
    max_lesion_elongation: float = 4.0
    #: ... and inscribed-ball diameter (mm) at or below which a piece cut from a larger
    #: enhancing structure is a vessel, not a lesion beside it
    max_attached_thickness_mm: float = 2.0
    #: centre lines of thin bright tubes (Hessian) at least this long (mm) are vessels ...
    min_vessel_length_mm: float = 8.0
    #: ... cut out of the candidates with this margin (mm) before they are split into peaks, so a
    #: lesion touching a vessel is a candidate of its own (0 = no cut)
    vessel_cut_mm: float = 1.0
    #: candidate classifier: "" = the shipped model (boosted trees), a path to another,
    #: "none" = rules
    classifier: str = ""
    #: a candidate passing the hard rules is a lesion when the classifier's probability is at least
    #: this (visits with a pre-contrast scan) ...
    min_probability: float = 0.5
    #: ... or this (post-only visits, where more mimics stay bright and the evidence is weaker)
    min_probability_post_only: float = 0.4
    #: with a pre-contrast scan: a lesion's own pre-contrast level (% of NAWM) is at least this;
    #: lower is CSF or a vessel in a sulcus (acute lesions are at most mildly T1-hypointense)
    min_pre_level_pct: float = 60.0

    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    review: ReviewSettings = field(default_factory=ReviewSettings)

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if self.connectivity not in (6, 18, 26):
            raise ValueError(f"connectivity must be 6, 18 or 26, not {self.connectivity}")
        if self.min_voxels < 1:
            raise ValueError("min_voxels must be >= 1")
        if self.min_volume_mm3 < 0:
            raise ValueError("min_volume_mm3 must be >= 0")

    @property
    def skimage_connectivity(self) -> int:
        """The ``connectivity`` argument scikit-image expects (1, 2 or 3)."""
        return {6: 1, 18: 2, 26: 3}[self.connectivity]

    def subset_toml(self, fields: tuple[str, ...]) -> str:
        """TOML of only ``fields``: what one step depends on, so that changing a detection
        threshold does not invalidate the cached bias correction or registration.

        >>> Settings(min_voxels=5).subset_toml(PREPARE_FIELDS) == Settings().subset_toml(PREPARE_FIELDS)
        True
        """
        return tomli_w.dumps({k: v for k, v in self.to_dict().items() if k in fields})

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    # --- TOML ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_toml_string(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def to_toml(self, path: str | Path) -> None:
        from lesionpipe.imageio import atomic_write_text

        atomic_write_text(path, self.to_toml_string())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        data = dict(data)
        sections = {"analysis": AnalysisSettings, "review": ReviewSettings}
        kwargs: dict[str, Any] = {}
        for name, klass in sections.items():
            if name in data:
                kwargs[name] = _build(klass, data.pop(name), prefix=f"{name}.")
        kwargs.update(_build_kwargs(cls, data, exclude=set(sections)))
        return cls(**kwargs)

    @classmethod
    def from_toml_string(cls, text: str) -> "Settings":
        return cls.from_dict(tomllib.loads(text))

    @classmethod
    def from_toml(cls, path: str | Path) -> "Settings":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read settings file {path}: {exc.strerror}") from None
        try:
            return cls.from_toml_string(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"settings file {path} is not valid TOML: {exc}") from None


#: the settings each preprocessing step depends on (detection depends on all top-level ones)
PREPARE_FIELDS = ("bias_correct", "n4_shrink", "n4_iterations")
REGISTER_FIELDS = ("register", "registration_sampling")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _build_kwargs(klass: type, data: dict[str, Any], *, exclude: set[str] = frozenset(),
                  prefix: str = "") -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(klass) if f.name not in exclude}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown setting '{prefix}{key}' in settings TOML")
        default = getattr(klass(), key) if not dataclasses.is_dataclass(fields[key].type) else None
        if isinstance(default, tuple):
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"setting '{prefix}{key}' must be true or false, not {value!r}")
        elif isinstance(default, float) and isinstance(value, int):
            value = float(value)
        elif default is not None and not isinstance(value, type(default)):
            raise ValueError(f"setting '{prefix}{key}' must be a {type(default).__name__}, "
                             f"not {value!r}")
        kwargs[key] = value
    return kwargs


def _build(klass: type, data: Any, *, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"settings section [{prefix.rstrip('.')}] must be a table")
    return klass(**_build_kwargs(klass, data, prefix=prefix))
