"""sdkit: inspect, convert, merge and apply Stable Diffusion model files."""

__version__ = "0.1.0"
