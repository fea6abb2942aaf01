"""The trainer's collaborators, one job each; the loop itself is :class:`ardir.trainer.Trainer`.

- :mod:`ardir.train.checks`: the argument checks and defaults of the Trainer's set-up (models, loaders,
  method, optimiser, schedule), and the unpacking of a loader's batch.
- :mod:`ardir.train.step`: one optimiser step: precision, backward, gradient all-reduce, gradient scaler and the
  NaN/Inf policy.
- :mod:`ardir.train.state`: where a run stands (counters, the running epoch's accumulators, random states,
  every process's share) and its part of a checkpoint.
- :mod:`ardir.train.validate`: natural and adversarial accuracy on the validation loader.
- :mod:`ardir.train.checkpoints`: what a checkpoint holds, when one is written, and resuming (the Trainer's
  ``state_dict``, ``load_state_dict``, ``save_checkpoint``, ``resume``; a base class of the Trainer).

None of them imports the trainer: the trainer wires them together.
"""
