"""The pure core: request model, instants, canonical hashing, plan, decisions, Merkle, audit chain.

Nothing in this package imports Dagster or performs I/O.
"""
