"""DDPM core: noise schedules, DDIM sampling with log-probs, the UNet."""
