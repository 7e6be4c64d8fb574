"""Building and reading the dataset: WebDataset tar shards, manifests, and the augmented views."""
