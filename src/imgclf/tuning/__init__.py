"""Hyperparameter tuning: the search space (space.py) and the local Optuna tuner (local.py)."""
