"""A local double of the Mosaic API (api.mosaic.so), in the spirit of stripe-mock.

It never imports from `app`; `app` never imports from it. See docs/sandbox.md.
"""

from mosaic_sandbox.app import create_app
from mosaic_sandbox.server import SandboxServer

__all__ = ["SandboxServer", "create_app"]
