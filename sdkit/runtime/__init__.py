"""Torch-side runtime: pipelines, sampler, trainer, validators, and the toy-world scorer."""
