"""Shared by the orchestrator and the site agents: specs, models, accounting, errors, serde."""
