"""ppo_ddpm.reward"""
