"""Stress testing for acquisition shift: `python -m jaxmed.stress --workdir W` (see jaxmed/stress/run.py)."""
