"""Training: the run's settings and glue (``run``), the ``Trainer``, the loss, the LR schedule, DDP and the metrics log."""
