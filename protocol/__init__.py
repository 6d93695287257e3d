"""Sans-IO NBD: bytes in, events out; events in, bytes out."""
