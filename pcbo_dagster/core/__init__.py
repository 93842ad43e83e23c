"""The pure core: request model, instants, canonical hashing, JSON documents, plan, decisions, Merkle,
audit chain.

Nothing in this package imports Dagster or performs I/O.
"""
