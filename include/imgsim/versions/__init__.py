"""Published model versions: manifests, validation, publish and rollback, the index lease."""
