"""The machinery under every job, free of gRPC: the broker (tasks out, results in, turns at
downloads and upload places), the spool (models and updates on disk), fan-out of one request to
many sites, and the store (jobs, rounds, charges in SQL)."""
