"""Sampling: plans from prompts and adapters, the diffusers pipeline run, PNG parameters, grids.

Nothing is imported here: each module is imported where it is used (some need torch,
some must not).
"""
