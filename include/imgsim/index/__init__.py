"""The index DAG's task bodies: sources to catalog, embedding, fit, validate, publish."""
