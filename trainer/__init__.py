"""Training and evaluation: pretraining (`trainer.pre`), the episodic meta stage (`trainer.meta`)."""
