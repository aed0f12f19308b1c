"""The site agent: the trust boundary in front of one site's data."""
