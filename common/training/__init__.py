"""What a federated training job is made of: the model zoo and its released form (models,
pipeline), the tensors a round carries (tensors), the one (q, steps) schedule (schedule)
and DP-SGLD's posterior sampling (sgld)."""
