"""Outlier scoring for density models, in small modules:

- :mod:`.scores`: the score types and their pure functions of model outputs (bits/dim, higher =
  more anomalous); the one place that says which score types a model offers;
- :mod:`.coders`: lossless code lengths for the complexity scores;
- :mod:`.scorer`: :class:`~.scorer.Scorer`, a loaded model (and its background) turned into scores;
- :mod:`.statistics`: the per-image statistics of a model's outputs that the ``dose`` score combines;
- :mod:`.dose`: their fitted tails and nearest-neighbour combination, and the ``explanation``;
- :mod:`.calibration`: thresholds and quantiles, and reading them back from a checkpoint;
- :mod:`.classify`: Bayes' rule for class-conditional models;
- :mod:`.colour`: the colour check that a model of grayscale images applies to uploaded files.

Scoring whole data sets (with a cache and progress bars) is an offline tool: models/tools/score_sets.py.
"""
