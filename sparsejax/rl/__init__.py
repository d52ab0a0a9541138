"""Reinforcement learning with sparse networks: a pure-JAX CartPole, DQN pieces, and Eau De
Q-Network (adaptive dense-to-sparse DQN)."""
from sparsejax.rl import cartpole
from sparsejax.rl.dqn import (Batch, Replay, epsilon_greedy, init_qnet, linear_epsilon,
                              q_values, replay_add, replay_init, replay_sample, td_loss,
                              td_targets)
from sparsejax.rl.eau_de_qn import (EauDeQNConfig, TrainState, greedy_return, init_state,
                                    kernel_sparsity, online_sparsities, select_and_prune, train,
                                    train_step)

__all__ = ["Batch", "EauDeQNConfig", "Replay", "TrainState", "cartpole", "epsilon_greedy",
           "greedy_return", "init_qnet", "init_state", "kernel_sparsity", "linear_epsilon",
           "online_sparsities", "q_values", "replay_add", "replay_init", "replay_sample",
           "select_and_prune", "td_loss", "td_targets", "train", "train_step"]
