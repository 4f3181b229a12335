"""Stage 04: tuning the policy against the reward model, online (APA, PPO, P3O) and offline (DPO).

Modules, in the order a run uses them (imports run down this list, never up):
  config    PolicyTrainConfig (every setting, with Starling's values) and PolicyTrainResult
  prompts   the initial policy's name, the train/held-out prompts, the step -> prompts schedule
  evaluate  held-out reward and KL to the initial policy, paired across methods
  io        saving policies where notebook 05 finds them; notebook 03's reward model
  methods   APA, PPO and P3O, one block each: targets from a rollout batch, and the loss
  online    the online loop (rollout, score, targets, minibatch updates), checkpoints, resume
  dpo       offline DPO through TRL's DPOTrainer, budgeted and evaluated like the online methods
  train     train_policy: the one entry point, by method
  report    tables, the reward-KL frontier and policy_metrics() for notebook 04
  __main__  the command line: python -m starling_lib.policy CONFIG.yaml [--set key=value ...]

The rollout machinery beside the package is shared with evaluation: starling_lib.rollout (the
shared-trunk policy, log-probs, generation) and starling_lib.sampling (the KV-cache sampler);
starling_lib.sft is the tiny model's warm-up that stands in for Openchat-3.5's instruction tuning.

A notebook imports what it needs from here:

    from starling_lib.policy import PolicyTrainConfig, train_policy, summary_table
"""

from starling_lib.policy.config import (INITIAL_POLICY, METHODS, PolicyTrainConfig, PolicyTrainResult, load_config,
                                        method_config, parse_method_lr)
from starling_lib.policy.evaluate import (ended_with_stop, eval_settings, evaluate_initial, evaluate_policy,
                                          policy_with_reference)
from starling_lib.policy.io import load_or_train_reward_model, policies_dir, save_policies, save_policy
from starling_lib.policy.methods import ONLINE_METHODS, normalize_scores
from starling_lib.policy.online import check_strategy, train_online
from starling_lib.policy.prompts import load_prompts, resolve_policy, step_prompts
from starling_lib.policy.report import (frontier_frame, history_frame, paired_difference, parameter_counts,
                                        phase_frame, policy_metrics, reward_gain, samples_frame, strip_method, summary_table)
from starling_lib.policy.train import train_policy

__all__ = ["INITIAL_POLICY", "METHODS", "ONLINE_METHODS", "PolicyTrainConfig", "PolicyTrainResult", "check_strategy",
           "ended_with_stop", "eval_settings", "evaluate_initial", "evaluate_policy", "frontier_frame", "history_frame",
           "load_config", "load_or_train_reward_model", "load_prompts", "method_config", "normalize_scores", "parameter_counts",
           "paired_difference", "parse_method_lr", "phase_frame", "policies_dir", "policy_metrics", "policy_with_reference", "resolve_policy", "reward_gain",
           "samples_frame",
           "save_policies", "save_policy", "step_prompts", "strip_method", "summary_table", "train_online",
           "train_policy"]
