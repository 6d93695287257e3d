"""The block layer: a graph of nodes, the generic request path, drivers. Knows nothing of NBD."""
