"""Compiling the run's programs for accelerators this machine does not have (deviceless AOT): targets, programs,
and what the compiler says about them."""
