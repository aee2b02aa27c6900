"""Backends behind `jattn.dot_product_attention`: one file each.

The contract every backend keeps is `jattn.backends.contract.Backend`; the one list
of backends is `jattn.backends.registry.BACKENDS`.  Shared per-head helpers (GQA
grouping, the vmaps over heads, the dropout key) live in `jattn.backends.heads`; no
backend imports another backend's module.
"""
