"""The orchestrator: schedules rounds, aggregates, accounts and releases models."""
