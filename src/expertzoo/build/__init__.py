"""Assembling zoos: `build` from a config (sources loaded, non-expert parameters averaged, router initialised), `load`
from a zoo folder, and the router inputs both collect."""
