"""What every job kind shares: the job's thread and its skeleton (``base``), the registry of
kinds (``kinds``), the account of a job's charges and its ε (``accounting``), and the model
card (``model_card``). The kinds themselves: ``orchestrator.training``,
``orchestrator.clustering``, ``orchestrator.synthesis``, ``orchestrator.evaluation``."""
