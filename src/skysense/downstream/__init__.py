"""Downstream fine-tuning and evaluation: task heads on any subset of the SkySense encoders.

* :mod:`skysense.downstream.tasks`: task models (classification, segmentation, change) and
  the :class:`~skysense.downstream.tasks.TaskSpec` saved with them.
* :mod:`skysense.downstream.heads`: linear classifier, UperNet decoder.
* :mod:`skysense.downstream.lr_decay`: layer-wise learning-rate decay.
* :mod:`skysense.downstream.finetune`: the resumable fine-tuning loop, saving and loading runs.
* :mod:`skysense.downstream.evaluate`: scores of a task model on a split (metrics in
  :mod:`skysense.evaluation.metrics`).
* :mod:`skysense.downstream.sliding_window`, :mod:`skysense.downstream.predictions`: windows
  over large tiles, GeoTIFF prediction maps.
* :mod:`skysense.downstream.registry`: the task, classes, splits and paper metric of each dataset.

Names are imported from their modules; this package re-exports nothing.
"""
