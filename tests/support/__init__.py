"""Helpers shared by the integration and chaos tests: processes, keys and tokens, bodies."""
