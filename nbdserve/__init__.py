"""nbdserve: an NBD server backed by a QEMU-style block graph."""

__version__ = "0.1.0"
