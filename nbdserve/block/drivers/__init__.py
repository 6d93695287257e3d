"""Driver registry: one line per driver."""
