"""The distillation pipeline library: teacher caching in Zarr and ReGLA student training on Ray."""
