"""The HF Trainer's protocol, item by item, on tiny inputs (no training): warmup rounding, best-checkpoint ties,
the direction of a loss metric, steps per epoch with the last partial batch, train.steps over phases, and the
validation loss. Each pins what transformers 5.23 does (read in trainer.py / training_args.py / trainer_callback.py).
"""

import math

import numpy as np
import pytest
import torch
from ml_collections import ConfigDict
from transformers import TrainingArguments
from transformers.optimization import get_linear_schedule_with_warmup

from jaxmed.config import base_config
from jaxmed.train import optim


def test_warmup_rounds_up_as_the_hf_trainer():
    """TrainingArguments.get_warmup_steps: math.ceil(total · ratio); 50 updates at 0.05 warm up for 3 (round: 2)."""
    total, ratio, lr = 50, 0.05, 1e-3
    args = TrainingArguments(output_dir="/tmp/unused", warmup_steps=ratio, report_to=[], use_cpu=True)
    warmup = args.get_warmup_steps(total)
    assert warmup == 3
    config = base_config().optim
    config.warmup_ratio = ratio
    ours = optim.schedule(config, lr, total)
    parameter = torch.nn.Parameter(torch.zeros(1))
    reference = get_linear_schedule_with_warmup(torch.optim.SGD([parameter], lr=lr), warmup, total)
    for update in range(total):
        assert abs(float(ours(update)) - reference.get_last_lr()[0]) <= 1e-6 * lr, update  # optax computes in float32
        reference.optimizer.step()
        reference.step()
