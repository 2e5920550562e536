"""Test doubles of Xen components that cannot run on this machine: the xenbus device (:mod:`.double`)."""
