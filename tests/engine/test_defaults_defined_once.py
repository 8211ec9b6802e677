"""Settings are defined once: a command's option defaults and a planner's defaults are read from the config
dataclass the stage runs with, so `emloc data`, `emloc plan` and the image planner cannot drift from what
`emloc run` / `emloc image` do (they had their own copies: 512, 0.1, 0, 0.1 margin, 1024 px)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from emloc_engine.cli.commands.data import data_config_from_args
from emloc_engine.cli.main import build_parser
from emloc_engine.data.config import DataConfig
from emloc_engine.images.options import ImageRunConfig
from emloc_engine.images.planning import ImagePlanConfig
from emloc_engine.run.planning import PlanConfig


def test_emloc_data_defaults_are_the_data_configs() -> None:
    args = build_parser().parse_args(["data", "chat.jsonl"])
    assert data_config_from_args("chat.jsonl", args) == DataConfig(path=Path("chat.jsonl"))


def test_emloc_plan_defaults_are_the_planners_and_the_image_runs() -> None:
    args = build_parser().parse_args(["plan", "Llama-3-8B"])
    assert args.margin == PlanConfig().safety_margin
    assert args.resolution == ImageRunConfig.__dataclass_fields__["resolution"].default


def test_the_image_planner_plans_the_image_runs_defaults() -> None:
    run = {f.name: f.default for f in dataclasses.fields(ImageRunConfig)}
    plan = ImagePlanConfig(Path("pipeline"), 2**30)
    for name in ("resolution", "batch_size", "rank", "max_sequence_length", "anchor"):
        assert getattr(plan, name) == run[name], name


def test_emloc_image_export_defaults_are_the_export_configs() -> None:
    from emloc_engine.images.export import ImageExportConfig

    args = build_parser().parse_args(["image-export", "RUN"])
    fields = {f.name: f.default for f in dataclasses.fields(ImageExportConfig)}
    assert tuple(args.format.split(",")) == fields["formats"]
    assert (args.name, args.device, not args.no_verify) == (fields["name"], fields["device"], fields["verify"])


def test_emloc_image_anchor_default_is_the_image_runs_and_the_trainings() -> None:
    from emloc_engine.images.training import ImageTrainConfig

    args = build_parser().parse_args(["image", "pipeline", "photos", "--out", "run"])
    run = ImageRunConfig.__dataclass_fields__["anchor"].default
    assert args.anchor == run == ImageTrainConfig.__dataclass_fields__["anchor"].default == "none"
