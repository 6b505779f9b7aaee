"""mlx-fleet: benchmarks package."""
