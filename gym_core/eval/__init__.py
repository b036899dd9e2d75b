"""Evaluation of models and runs."""
