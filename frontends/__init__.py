"""The frontend side of the engine.

Frontends are programs that turn build options into solve requests and return
references to results; they talk to ``solver`` through the bridge types in
``solver`` (``Frontend``, ``FrontendResult``). This package will hold the
``Client`` API they program against, the in-process forwarder and the
out-of-process gateway; it has no public names yet.
"""
