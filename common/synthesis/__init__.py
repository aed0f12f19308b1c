"""Generative models for DP synthetic data, trained like any dpfed model (issue 20)."""
