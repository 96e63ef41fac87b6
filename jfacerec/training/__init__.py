"""Training: the loop (`loop.train`), the jitted step, the optimizer and the train state.

    from jfacerec.training import train
    state = train(config, workdir)                # validate=Validator: see evaluation/validation
"""

from jfacerec.training.loop import NonFiniteLossError, Validator, train
from jfacerec.training.optimizer import center_optimizer, learning_rate_schedule, make_optimizer
from jfacerec.training.state import (EmaTrainState, TrainState, abstract_train_state,
                                     init_state, state_from_config)
from jfacerec.training.step import make_train_step, uses_sharded_head

__all__ = ["EmaTrainState", "NonFiniteLossError", "TrainState", "abstract_train_state",
           "center_optimizer", "init_state", "learning_rate_schedule", "make_optimizer",
           "make_train_step", "state_from_config", "train", "uses_sharded_head", "Validator"]
