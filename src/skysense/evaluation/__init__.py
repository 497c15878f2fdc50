"""Evaluation of frozen SkySense features: feature extraction and linear probing.

* :mod:`skysense.evaluation.features`: :func:`~skysense.evaluation.features.extract_features`,
  (N, D) pooled features and labels of a dataset split, computed once with the model frozen.
* :mod:`skysense.evaluation.linear_probe`: :func:`~skysense.evaluation.linear_probe.linear_probe`,
  a linear classifier on such features (single-label: softmax, overall accuracy; multi-label:
  sigmoid, mean average precision).

The functions are imported from their modules (``from skysense.evaluation.linear_probe import
linear_probe``); this package re-exports nothing, so the module names stay modules.
"""
