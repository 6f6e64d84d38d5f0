"""Evaluation metrics (FVD, KVD, FAD) and the feature-network weights they need."""
