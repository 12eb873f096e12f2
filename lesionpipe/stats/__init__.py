"""lesionpipe.stats: the trial's efficacy analysis from per-visit GEL counts (no Nipype).

- :mod:`lesionpipe.stats.nb`: NB2 regression (R ``MASS::glm.nb`` estimator), Poisson with
  overdispersion tests, NB2 random-intercept mixed model.
- :mod:`lesionpipe.stats.data`: reading and checking ``gel_counts.tsv`` and the design table.
- :mod:`lesionpipe.stats.efficacy`: primary and secondary analyses, ``run_analysis``.
- :mod:`lesionpipe.stats.report`: plots and the self-contained HTML page.
- :mod:`lesionpipe.stats.simulate` and :mod:`lesionpipe.stats.power`: simulated trials, bias,
  coverage and power.
"""
