"""mlx-fleet: broker package."""
