"""Training: the accelerate loop for experts and routers, and fitting routers built from data."""
