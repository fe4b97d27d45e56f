"""Training: the shared run set-up (run.py), the jitted step (step.py), the loop (loop.py), and the stages they use —
optimisers and phases (optim.py), the device mesh (mesh.py), orbax checkpoints (checkpoint.py), metrics files."""

from jaxmed.train.loop import train, validation_metrics
from jaxmed.train.run import (ModelSpec, Run, abstract_state, build_model, init_state, make_eval_step, model_spec,
                              place_weights, predict, setup)
from jaxmed.train.step import cross_entropy, make_train_step, step_function

__all__ = ["ModelSpec", "Run", "abstract_state", "build_model", "cross_entropy", "init_state", "make_eval_step",
           "make_train_step", "model_spec", "place_weights", "predict", "setup", "step_function", "train",
           "validation_metrics"]
