"""Training GRACE models: the GRPO trainer on TRL, its config and rewards, dataset shaping, callbacks, checkpoints,
and the contrastive (+CL) baseline trainer. Needs the train extra (``pip install "grace-st[train]"``)."""
