"""Versioned wire protocol (dpfed.v1) and its committed generated code."""
