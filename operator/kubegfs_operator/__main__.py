"""``kubegfs-operator``: run the operator cluster-wide with a liveness endpoint."""

from __future__ import annotations

import click


@click.command()
@click.option("--liveness", default="http://0.0.0.0:8080/healthz", show_default=True,
              help="kopf liveness endpoint URL ('' to disable)")
@click.option("--namespace", "namespaces", multiple=True, help="watch only these namespaces (default: all)")
@click.option("--log-format", type=click.Choice(["plain", "full", "json"]), default="plain", show_default=True)
@click.option("--verbose", is_flag=True)
def main(liveness: str, namespaces: tuple[str, ...], log_format: str, verbose: bool) -> None:
    """The kubegfs operator: Snapshot and Restore resources."""
    import kopf

    from . import main as _handlers  # noqa: F401 - registers the handlers

    kopf.configure(verbose=verbose, log_format=kopf.LogFormat[log_format.upper()])
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        liveness_endpoint=liveness or None,
    )


if __name__ == "__main__":
    main()
