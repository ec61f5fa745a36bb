"""Staged rollouts: the spec, cohort choice, gate evaluation and the state machine (all pure),
and the controller that drives them against the database (controller.py)."""
