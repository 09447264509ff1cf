"""Hyperparameter search over a training task's Config/* constants with ClearML's HyperParameterOptimizer.

    python code/scripts/hpo.py BASE --queue QUEUE --param learning_rate=loguniform:1e-4:1e-1 \
        --param batch_size=choice:4,8 [--space FILE] [--trials 10] [--concurrent 1] [--time-limit MIN]

BASE is a task id, or a config name (the newest completed training task of that name in project
"Pascal-VOC12 Training"). A clearml-agent must serve QUEUE. The objective is val/mIoU, maximised.
"""

import argparse

from vocseg.errors import UserError, exit_with


def main(argv=None) -> None:
    from vocseg.clearml import search as hs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="base training task: task id or config name")
    parser.add_argument("--queue", required=True, help="execution queue served by a clearml-agent")
    parser.add_argument(
        "--param",
        action="append",
        metavar="NAME=RANGE",
        help="loguniform:MIN:MAX, uniform:MIN:MAX[:STEP], int:MIN:MAX[:STEP] or choice:A,B,...",
    )
    parser.add_argument("--space", help="Python file defining space = {name: range, ...} (a list is a choice)")
    parser.add_argument("--strategy", choices=hs.STRATEGIES, default="random")
    parser.add_argument("--trials", type=int, default=10, help="number of trials in all")
    parser.add_argument("--concurrent", type=int, default=1, help="trials running at the same time")
    parser.add_argument("--time-limit", type=float, help="minutes for the whole search")
    parser.add_argument("--poll-seconds", type=float, default=30.0, help="how often trial status is checked")
    args = parser.parse_args(argv)
    try:
        if args.trials < 1 or args.concurrent < 1:
            raise UserError(f"--trials {args.trials} --concurrent {args.concurrent}: both must be at least 1")
        ranges = hs.parse_ranges(args.param, args.space)
        summary = hs.search(
            args.base,
            ranges,
            args.queue,
            args.strategy,
            hs.Budget(args.trials, args.concurrent, args.time_limit, args.poll_seconds),
        )
    except UserError as exc:
        exit_with(exc)
    done = sum(status == "completed" for status in summary["trials"].values())
    print(f"hpo: {done} of {len(summary['trials'])} trials completed (optimiser task {summary['optimizer_task_id']})")
    for task_id, status in sorted(summary["trials"].items()):
        if status != "completed":
            print(f"hpo: trial {task_id} {status}: see its console log on the server")
    best = summary["best"]
    if not best:
        exit_with(UserError("no trial completed: look at the trials' console logs on the server"), 1)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(best["parameters"].items()))
    print(f"hpo: best trial {best['task_id']}: val mIoU {best['val_mIoU']:.4f} with {shown}")


if __name__ == "__main__":
    main()
