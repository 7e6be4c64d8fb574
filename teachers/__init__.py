"""Teacher specs turned into loaded models with their preprocessing, fingerprint and outputs."""
