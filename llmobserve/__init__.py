"""llmobserve: track the cost of every paid API call through a local proxy.

This module is the public SDK surface. Importing it must never import Twisted.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
