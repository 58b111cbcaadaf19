"""Speed benchmarks of the zoo (shared/BENCHMARKS.md): `python -m bench [--quick]`, results in docs/results/."""
