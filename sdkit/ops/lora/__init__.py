"""LoRA and LyCORIS files: bake into a model, merge, extract from two models, resize.

Nothing is imported here: each module is imported where it is used (some need torch,
some must not).
"""
