"""The per-token machinery of a zoo layer: routing decisions, per-call state, sites, the layer, dispatch. No I/O."""
