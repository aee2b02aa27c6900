"""Backends behind `jattn.dot_product_attention`: one file each.

Each backend module exposes ``NAME``, ``refusal(call, platform) -> str | None`` (why it
cannot serve a call, or None) and ``run(call, platform) -> (out, weights, lse)`` where ``out`` is
``[B, T, N, Hv]``, ``weights`` ``[B, N, T, S]`` or None, ``lse`` ``[B, T, N]`` or None.
"""
