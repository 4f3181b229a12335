"""python -m starling_lib.policy CONFIG.yaml [--set key=value ...]: one policy-tuning run.

    python -m starling_lib.policy configs/policy/tiny_cpu.yaml --set method=ppo --set steps=4
    accelerate launch --config_file configs/accelerate/ddp.yaml -m starling_lib.policy configs/policy/starling_apa_7b.yaml
"""

from __future__ import annotations

import sys
from typing import Sequence

from starling_lib.policy.config import PolicyTrainConfig
from starling_lib.policy.train import train_policy
from starling_lib.training import config_main


def main(argv: Sequence[str] | None = None) -> int:
    return config_main(PolicyTrainConfig, train_policy, argv, prog="python -m starling_lib.policy",
                       description="Tune a policy against a reward model: APA, PPO, P3O (online) or DPO (offline).",
                       example="configs/policy/tiny_cpu.yaml")


if __name__ == "__main__":
    sys.exit(main())
