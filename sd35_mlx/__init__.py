"""sd35_mlx: Stable Diffusion 3 / 3.5 in MLX."""

__version__ = "0.1.0"
