"""Answers: the in-process lookup, the query DAG's task bodies, the results writer."""
