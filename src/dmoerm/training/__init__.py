"""Training: one function per phase, explicit inputs and outputs (see :mod:`dmoerm.training.phases`)."""
