"""The buildfile frontend as a gateway program: ``python -m frontends.buildfile``.

Run by :class:`frontends.gateway.Gateway` (``opts["source"]``), it speaks the
gateway protocol over its stdin and stdout; the build function is the same one
the in-process forwarder runs.
"""

from frontends.buildfile import build
from frontends.gateway import serve

if __name__ == "__main__":
    serve(build)
