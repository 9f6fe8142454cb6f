"""Settings for iepnode: one frozen object, validated once at start-up.

This package imports no other project package.
"""

from config.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings"]
