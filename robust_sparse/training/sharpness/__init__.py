"""Sharpness-aware minimisation: SAM and ASAM (sam.py), Sparse SAM's masks (ssam.py,
sparse_perturbation.py).

May import: `robust_sparse.core`, `robust_sparse.nn`, the rest of `robust_sparse.training`.
"""
