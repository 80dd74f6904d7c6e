"""ppo_ddpm.ppo"""
