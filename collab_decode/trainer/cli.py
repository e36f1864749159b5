"""`collab-decode train-router DATASET --out DIR`: train, calibrate and save a neural router."""

from __future__ import annotations

import argparse
import dataclasses

from collab_decode.trainer.train import TrainSettings


def add_train_router_parser(sub) -> None:
    p = sub.add_parser("train-router", help="train a neural router on a label dataset (collab-decode label)",
                       description="Train the R2R-style router (an MLP over the small model's hidden state, the "
                                   "proposed token's embedding and its top-k logits) on a label dataset, with a "
                                   "validation split by query, early stopping, and a threshold calibrated to a "
                                   "recall target. Prints ROC-AUC and PR-AUC against entropy, top-1 probability "
                                   "and top-2 margin on the same validation rows.")
    p.add_argument("dataset", help="a finished `collab-decode label` output directory")
    p.add_argument("--out", required=True, help="router checkpoint directory to write (config.json + safetensors)")
    for f in dataclasses.fields(TrainSettings):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=f"(default: {f.default})")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f"(default: {f.default!r})")
    p.set_defaults(func=cmd_train_router)


def cmd_train_router(args: argparse.Namespace) -> int:
    from collab_decode.trainer.train import describe, train_router

    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)})
    result = train_router(args.dataset, args.out, settings)
    print(describe(result.config))
    print(f"saved to {args.out}")
    return 0
