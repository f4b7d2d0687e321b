"""Who may talk to whom: identities, certificates, mutual TLS, the access policy, the audit log.

Shared by the scheduler and the agent like the wire contract beside it: an
identity is part of how the two sides address each other.
"""
