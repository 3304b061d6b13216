"""Security: who the caller is (tokens, SMART Backend Services as a server), which cases they may
see, the audit trail, and our own client keys for partners.

May import: `store`, `settings`, `errors`, `resources`. Nothing in a step package.
"""
