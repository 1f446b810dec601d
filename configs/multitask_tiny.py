"""Multi-task MoE on the built-in corpus: HoME multi-gate routing (Wang et al., 2024).

Documents fall into 4 pseudo-tasks (crc32(text) mod 4, ``data.num_tasks``) in 2
categories; each MoE layer has one gate per task over 4 shared experts, 1 expert per
category and 1 per task (``moejax.routers.multigate``).

python -m moejax.train --config configs/multitask_tiny.py --workdir runs/multitask
"""

import os

from moejax.training.workdir import load_config_file


def get_config():
  cfg = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_cpu.py"))
  moe = cfg.model.moe
  moe.router = "multigate"
  moe.num_tasks = 4
  moe.task_categories = (0, 0, 1, 1)
  moe.num_experts = 10  # 4 shared + 2 categories x 1 + 4 tasks x 1
  moe.num_category_experts = 1
  moe.num_task_experts = 1
  moe.top_k = 2
  cfg.data.num_tasks = 4
  return cfg
