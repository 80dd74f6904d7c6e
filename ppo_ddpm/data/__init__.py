"""ppo_ddpm.data"""
