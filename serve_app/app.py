"""Application builder: `serve run configs/config.yaml`, or on the command line
`serve run serve_app.app:build_app model.path=DIR engine.mode=prefix ...`."""

import logging
from typing import Any

from ray.serve import Application

from models.checkpoint import ensure_demo_checkpoint
from serve_app.config import AppArgs
from serve_app.ingress import ScoreIngress
from serve_app.scorer import Scorer

log = logging.getLogger("ray.serve")


def build_app(args: dict[str, Any]) -> Application:
    """The builder `serve run` calls with a config's `args` (or key=value pairs; dotted keys
    reach into a group). Replica counts and resources come from the config's `deployments:`."""
    return build_graph(args)


def build_graph(
    args: AppArgs | dict[str, Any],
    scorer_options: dict[str, Any] | None = None,
    ingress_options: dict[str, Any] | None = None,
) -> Application:
    """Ingress -> Scorer replicas; `scorer_options` / `ingress_options` go to the deployments'
    `.options()` (Python callers; `serve run` configs set them under `deployments:`)."""
    args = AppArgs.parse(args)
    if args.model.path is None:
        path = ensure_demo_checkpoint(args.model.demo_preset)
        log.warning(
            "no model.path: serving the RANDOM-WEIGHT demo checkpoint %s (%s); scores "
            "are meaningless",
            args.model.demo_preset,
            path,
        )
    log.info("mis-serve settings: %s", args.model_dump(mode="json"))  # keys print as ***
    scorer = Scorer.options(**scorer_options) if scorer_options else Scorer
    ingress = ScoreIngress.options(**ingress_options) if ingress_options else ScoreIngress
    return ingress.bind(scorer.bind(args.scorer_args()), args.ingress_args())
