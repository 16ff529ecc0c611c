"""``turnout distill``: build ``smollm2-small`` from SmolLM2-135M-Instruct (layer pruning + KL distillation)."""
