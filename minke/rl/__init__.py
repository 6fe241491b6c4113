"""Reinforcement learning with verifiable rewards (DeepSeek-R1): rewards, GRPO math, rollouts, training."""
