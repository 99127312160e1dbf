"""Inspect or roll back the champion of a registered model (see :mod:`resources.mlflow_registry`)::

    python -m orchestration.promotion rollback --model blip-med [--to VERSION] [--data DATA]
    python -m orchestration.promotion status --model blip-med

Rolling back points ``champion`` at the current champion's ``previous_champion`` (or ``--to``);
only a former champion can be restored.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence

from mlflow.exceptions import MlflowException

from resources.mlflow_registry import MED_MODEL, registry_for
from resources.mlflow_tracking import MlflowResource


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orchestration.promotion rollback|status --model NAME``."""
    p = argparse.ArgumentParser(prog="python -m orchestration.promotion",
                                description="Inspect or roll back the champion of a registered model.")
    p.add_argument("command", choices=["rollback", "status"])
    p.add_argument("--model", default=MED_MODEL, help=f"registered model (default {MED_MODEL})")
    p.add_argument("--to", help="rollback: version to make champion (default: the previous champion)")
    p.add_argument("--data", default=os.environ.get("BLIP_OPS_DATA", "data"),
                   help="data folder of the embedded store (default: $BLIP_OPS_DATA or data)")
    p.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI, else the "
                                                      "embedded SQLite store of --data")
    args = p.parse_args(argv)
    registry = registry_for(MlflowResource(data_dir=args.data, tracking_uri=args.tracking_uri))
    try:
        if args.command == "status":
            print(json.dumps(registry.status(args.model), indent=2))
            return 0
        demoted, champion = registry.rollback(args.model, args.to)
    except (ValueError, MlflowException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.model}: champion v{demoted} -> v{champion}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
