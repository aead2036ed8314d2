"""``lethe-operator``: run the Lethe operator (kopf) against the current cluster.

    lethe-operator --namespace team-a --store s3://models/lethe --trainer-image REGISTRY/lethe-trainer:TAG

Options override the LETHE_* environment variables (see ``settings.py``).
Without --namespace the operator watches all namespaces, which needs
cluster-wide RBAC. The operator runs standalone (no kopf peering) unless
--peering is given; run one replica, because peering is not leader election.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

import kopf

from . import settings as operator_settings

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = operator_settings.from_environment()
    parser = argparse.ArgumentParser(prog="lethe-operator", description="Run the Lethe operator.")
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="namespace to watch (repeatable; kopf glob patterns allowed); default all namespaces")
    parser.add_argument("--trainer-image", default=defaults.trainer_image,
                        help="trainer image for Jobs whose request sets no spec.job.image ($LETHE_TRAINER_IMAGE)")
    parser.add_argument("--trainer-command", default=None,
                        help="trainer container command, JSON list or shell words ($LETHE_TRAINER_COMMAND); "
                             f"default {' '.join(defaults.trainer_command)}")
    parser.add_argument("--store", default=defaults.store_uri,
                        help="store URI for lineages without spec.store.uri, s3://BUCKET/PREFIX or file:///PATH "
                             "($LETHE_STORE_URI)")
    parser.add_argument("--s3-endpoint-url", default=defaults.s3_endpoint_url,
                        help="S3 endpoint for the store and the trainer ($LETHE_S3_ENDPOINT_URL); default AWS")
    parser.add_argument("--credentials-secret", default=defaults.credentials_secret,
                        help="Secret given as envFrom to init Jobs and to requests without spec.job.credentialsSecret")
    parser.add_argument("--init-gpus", type=int, default=defaults.init_gpus,
                        help="nvidia.com/gpu limit of lineage init Jobs ($LETHE_INIT_GPUS)")
    parser.add_argument("--metrics-port", type=int, default=defaults.metrics_port,
                        help="port of the Prometheus /metrics endpoint, 0 to disable ($LETHE_METRICS_PORT)")
    parser.add_argument("--metrics-address", default=defaults.metrics_address,
                        help="address the metrics endpoint listens on ($LETHE_METRICS_ADDRESS)")
    parser.add_argument("--liveness", default=None, metavar="URL",
                        help="kopf liveness endpoint, such as http://0.0.0.0:8080/healthz")
    parser.add_argument("--peering", default=None, metavar="NAME",
                        help="join the kopf peering NAME instead of running standalone")
    parser.add_argument("--verbose", action="store_true", help="log at DEBUG level")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configured = dataclasses.replace(
        operator_settings.from_environment(),
        trainer_image=args.trainer_image,
        store_uri=args.store,
        s3_endpoint_url=args.s3_endpoint_url,
        credentials_secret=args.credentials_secret,
        init_gpus=args.init_gpus,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
    )
    if args.trainer_command:
        configured = dataclasses.replace(configured,
                                         trainer_command=operator_settings.parse_command(args.trainer_command))
    operator_settings.configure(configured)

    from . import handlers  # noqa: F401 - registers the handlers with kopf's default registry

    logger.info("Watching %s", ", ".join(args.namespace) if args.namespace else "all namespaces")
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        namespaces=args.namespace,
        clusterwide=not args.namespace,
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
