"""One plain sentence for each setting under the Plan page's "Advanced" (the engine's help stays the tooltip).

The engine's ``help`` texts speak the method's language for people who know it; these say what a setting
changes for someone who does not.
"""

from __future__ import annotations

PLAIN: dict[str, str] = {
    "ratio": "How much of each layer the smaller stand-in model keeps: more is closer to your model but needs "
    "more memory. The planner picks the most that fits.",
    "allocation": "Lets each layer keep as much as it needs instead of the same share everywhere: a slower "
    "start, measured better when much is kept.",
    "anchor": "Keeps the stand-in close to your model on your examples, so more of what it learns carries over.",
    "gpus": "How many of this machine's GPUs share the training.",
    "rank": "Size of the add-on the training learns: larger can learn more and needs a little more memory.",
    "alpha": "How strongly the add-on changes the model (usually twice its size).",
    "dropout": "Randomly ignores a share of the add-on's input while training, against learning the examples "
    "by heart.",
    "steps": "How long it trains: more steps learn more and take longer.",
    "lr": "How big each training step is: too high is unstable, too low learns slowly.",
    "batch_size": "Examples looked at together in one step: more uses more memory.",
    "grad_accum": "Steps added up before the add-on changes: a larger effective batch without more memory.",
    "warmup_steps": "Steps at the start where the step size ramps up, for a stable start.",
    "eval_every": "How often the held-out loss is measured (the orange dots on the plot).",
    "save_every": "How often progress is saved, so a stopped run can continue.",
    "seed": "Makes the run repeatable: the same seed, settings and data give the same result.",
    "lambda": "How the add-on is adjusted for your full model after training on the stand-in; auto tries "
    "a few and keeps the best on held-out examples.",
}
