"""The teacher cache: the Zarr store, caching one shard, and reading the store back (inspect, verify)."""
