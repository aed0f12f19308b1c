"""Training jobs (``kind: train``): federated DP-SGD rounds, their aggregation and card."""
