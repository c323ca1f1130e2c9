"""Enqueue a dream's walk for the Celery worker of `examples/celery_app.py`.

python examples/enqueue.py 42                  # processing -> completed
python examples/enqueue.py 42 --fail           # processing -> failed
python examples/enqueue.py 42 --delete --wait  # delete_processing -> delete_completed, wait for it
"""

from __future__ import annotations

import argparse

from celery_app import delete_dream, generate_dream  # this file's directory is on sys.path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dream_id", type=int)
    parser.add_argument("--delete", action="store_true", help="delete the dream's images instead")
    parser.add_argument("--fail", action="store_true", help="end in failed / delete_failed")
    parser.add_argument("--step-delay", type=float, default=1.0, help="seconds of simulated work per step")
    parser.add_argument("--wait", action="store_true", help="wait for the task and print its outcome")
    args = parser.parse_args(argv)

    task = delete_dream if args.delete else generate_dream
    result = task.delay(args.dream_id, fail=args.fail, step_delay=args.step_delay)
    print(f"enqueued {task.name}[{result.id}] for dream {args.dream_id}")
    if args.wait:
        # The task's result (its image URLs) or, for a task that failed, its state and error.
        value = result.get(timeout=60, propagate=False)
        print(f"{result.state}: {value}")


if __name__ == "__main__":
    main()
