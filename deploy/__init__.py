"""Deployment helpers: real SuperLink/SuperNode processes, TLS, node auth, network namespaces."""
