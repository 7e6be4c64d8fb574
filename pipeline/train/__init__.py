"""Training students from the cache: the data stream, the losses, and one Ray Train worker's loop."""
