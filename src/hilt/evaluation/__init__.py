"""Evaluation: held-out loss and bits per byte (``evaluate``), what the ILTs do (``inspect``), training curves
(``plot``).
"""
