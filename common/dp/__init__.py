"""Differential privacy: the events a ledger records, the accountants that bound their ε, and
the private noise the releases draw. Pure maths (no transport, no files); the derivations are
in ``docs/accounting.md``."""
