"""Evaluation: loss and routing statistics, the routing viewer, greedy generation."""
