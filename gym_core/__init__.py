"""gym: a plugin-registry framework for post-training language models.

The public names a plugin needs are importable from here without importing torch.
"""

from gym_core.plugin.hookspecs import hookimpl, hookspec

__version__ = "0.3.0"
#: The plugin API version; plugins may declare which one they need.
API_VERSION = "2"

__all__ = ["API_VERSION", "__version__", "hookimpl", "hookspec"]
