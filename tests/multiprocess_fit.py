"""Run `kar.engine.fit` under `accelerate launch` and write what each process saw.

Used by tests/test_engine.py::test_fit_under_accelerate_launch_with_two_processes:

    python -m accelerate.commands.launch --cpu --num_processes 2 tests/multiprocess_fit.py OUT

Each process writes OUT/rank<i>.json with its FitResult and a check of gathered predictions;
tracking runs around fit as the pipeline does, so only rank 0 may create W&B files.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from kar.engine import TrainConfig, fit, make_loader, predict
from kar.tracking import LoggerConfig, tracking_run


def synthetic_split(n_rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    x = torch.randn(n_rows, 6, generator=generator)  # (N, 6)
    weights = torch.linspace(-1.5, 1.5, 6)  # (6,)
    prob = torch.sigmoid(x @ weights)  # (N,)
    label = (torch.rand(n_rows, generator=generator) < prob).float()
    return {"x": x, "label": label}


class LinearModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(batch["x"]).squeeze(-1)  # (B,)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    # Sizes that are not multiples of batch x processes, so accelerate must pad and de-pad.
    splits = {
        name: synthetic_split(n_rows, generator)
        for name, n_rows in (("train", 1001), ("valid", 499), ("test", 503))
    }
    torch.manual_seed(0)
    model = LinearModel()
    cfg = TrainConfig(max_epochs=3, batch_size=64, eval_batch_size=50, lr=0.05, cpu=True)
    logger = LoggerConfig(mode="offline")
    with tracking_run(logger, {"train": asdict(cfg)}, args.out / "wandb_run") as tracker:
        result = fit(
            model, splits, cfg, seed=1, checkpoint_path=args.out / "best.pt", tracker=tracker
        )

    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(make_loader(splits["valid"], 7, shuffle=None))
    labels, _ = predict(model, loader, accelerator)
    report = asdict(result) | {
        "predictions": {
            split: [labels_.tolist(), logits.tolist()]
            for split, (labels_, logits) in result.predictions.items()
        },
        "num_processes": accelerator.num_processes,
        "process_index": accelerator.process_index,
        "gathered_labels_match": bool(
            torch.equal(torch.from_numpy(labels), splits["valid"]["label"])
        ),
    }
    path = args.out / f"rank{accelerator.process_index}.json"
    path.write_text(json.dumps(report))
    # Tear the process group down before exit: a gloo thread still alive at interpreter
    # shutdown aborts the process ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
