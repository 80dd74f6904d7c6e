"""PPO fine-tuning of a DDPM sampled with DDIM (two-pass trajectory PPO, DDPO option, CUDA graphs).

    trainer = PPOTrainer(cfg, policy, reward_fn, device)
    stats = trainer.step(iteration)          # rollout (pass 1) + update (pass 2)
"""
from .rollout import RolloutNoise, derive_seed
from .trainer import PPOTrainer

__all__ = ["PPOTrainer", "RolloutNoise", "derive_seed"]
