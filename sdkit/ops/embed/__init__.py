"""Textual-inversion embeddings inserted into a model (a diffusers folder).

Nothing is imported here: each module is imported where it is used (some need torch,
some must not).
"""
