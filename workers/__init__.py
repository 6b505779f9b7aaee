"""mlx-fleet: workers package."""
