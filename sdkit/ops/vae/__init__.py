"""A checkpoint's VAE: swap it for another, extract it.

Nothing is imported here: each module is imported where it is used (some need torch,
some must not).
"""
