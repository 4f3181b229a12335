"""`train_policy`: the one entry point of stage 04, for every method.

APA, PPO and P3O go to the online loop (policy.online); DPO to TRL's DPOTrainer (policy.dpo).
Both return a PolicyTrainResult evaluated the same way, so notebook 04 treats them alike.
"""

from __future__ import annotations

from starling_lib.policy.config import PolicyTrainConfig, PolicyTrainResult
from starling_lib.policy.dpo import train_dpo
from starling_lib.policy.online import train_online


def train_policy(cfg: PolicyTrainConfig, stop_after: int | None = None, reward_model=None,
                 initial_eval: dict | None = None) -> PolicyTrainResult:
    """Tune the initial policy as `cfg` says (resuming from a checkpoint in output_dir if there is one).

    stop_after: end after that many steps in total, as if interrupted (online methods only).
    reward_model: a scorer instead of the folder `cfg.reward_model` (see train_online); DPO does
        not train on it, it evaluates with it.
    initial_eval: `evaluate_initial(cfg)`'s result, used as the step-0 evaluation instead of
        repeating it (at step 0 the policy is the initial one: same prompts, same random numbers).
    """
    if cfg.method == "dpo":
        return train_dpo(cfg, stop_after=stop_after, reward_model=reward_model, initial_eval=initial_eval)
    return train_online(cfg, stop_after=stop_after, reward_model=reward_model, initial_eval=initial_eval)
