"""Training code: the only part of qwen3vl_lab that imports torch (the `train` extra).

Nothing else in the package imports this folder.
"""
