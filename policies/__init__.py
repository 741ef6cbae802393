"""Sans-IO signature policies: end-to-end signatures, keys and roles, firewall decisions.

Filled in by the security-gateway work; it imports neither trio nor sockets.
"""
