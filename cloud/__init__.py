"""edgeloop cloud side: ingest, store, training, registry, rollouts."""
