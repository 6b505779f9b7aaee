"""mlx-fleet: actors package."""
