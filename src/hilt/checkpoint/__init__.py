"""Checkpoints on disk: the versioned .pt files training writes (``store``) and the folders ``hilt export``
writes, read back without transformers (``exported``).
"""
