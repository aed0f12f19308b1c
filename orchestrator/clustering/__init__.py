"""Mixture jobs (``kind: gmm``): federated DP EM over the sites, K by distributed BIC."""
