"""The frontend side of the engine: the ``Client`` API that frontends program
against, the in-process forwarder and the out-of-process gateway.

Nothing here is implemented yet in this version; see the project's issues.
"""
