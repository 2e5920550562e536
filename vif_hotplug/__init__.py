"""Routed network hotplug for Xen driver domains."""

__version__ = "0.1.0"
