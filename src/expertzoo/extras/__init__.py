"""Tools on top of zoos: pruning and merging experts, merging PEFT adapters, Co-LLM deferral (collab)."""
