"""Drift reaches a person: `covid-cxr alerts --webhook URL`, on Prefect's own machinery.

prefect.yaml declares the trigger once, on the retrain deployment (`retrain-on-drift`: a `monitor`
run that ends in the state named Drift). `prefect deploy` makes that an automation that runs the
retrain deployment. This command adds the other half from the same trigger: a webhook block
(Prefect's `CustomWebhookNotificationBlock`, saved as `covid-cxr-drift`) and the automation
`covid-cxr-drift-alert`, whose action sends a notification through it: what drifted (the monitor
run's state message) and which run. Running it again replaces both, so it is safe to repeat.
Needs a Prefect server (PREFECT_API_URL).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

from covid_cxr.config import Paths

BLOCK = "covid-cxr-drift"
AUTOMATION = "covid-cxr-drift-alert"
TRIGGER = "retrain-on-drift"       # the trigger's name in prefect.yaml
SUBJECT = "covid-cxr: prediction drift"
BODY = ("{{ flow_run.state.message }}\n"
        "Monitor run {{ flow_run.name }} ({{ flow_run.id }}); the drift report is its `drift-report` artifact.")
TRIGGER_KEYS = ("expect", "match", "match_related", "posture", "threshold", "within", "after", "for_each")


def drift_trigger_spec(root: Path) -> dict[str, Any]:
    """The `retrain-on-drift` trigger of prefect.yaml, as an EventTrigger's fields."""
    doc = yaml.safe_load((Path(root) / "prefect.yaml").read_text())
    for dep in doc.get("deployments") or []:
        for trig in dep.get("triggers") or []:
            if trig.get("name") == TRIGGER:
                return {k: v for k, v in trig.items() if k in TRIGGER_KEYS}
    raise KeyError(f"prefect.yaml declares no trigger named {TRIGGER!r}")


def setup_alerts(root: Path, webhook: str) -> dict[str, str]:
    """Save the webhook block and (re)create the alert automation. -> their ids."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger

    block = CustomWebhookNotificationBlock(name="covid-cxr drift", url=webhook,
                                           json_data={"subject": "{{subject}}", "body": "{{body}}"})
    block_id = block.save(BLOCK, overwrite=True)
    try:
        Automation.read(name=AUTOMATION).delete()
    except ValueError:            # none yet
        pass
    auto = Automation(name=AUTOMATION, description="Drift in the prediction log: tell a person (webhook).",
                      trigger=EventTrigger(**drift_trigger_spec(root)),
                      actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)]).create()
    return {"block": str(block_id), "automation": str(auto.id)}


def register(app: typer.Typer, data_app: typer.Typer) -> None:  # noqa: ARG001
    @app.command("alerts")
    def alerts_cmd(
        webhook: str = typer.Option(..., "--webhook", help="URL the drift alert is POSTed to (JSON: subject, body)."),
    ) -> None:
        """Drift notifies a person: a webhook block and an automation on the monitor's Drift state
        (the same trigger as prefect.yaml's retrain-on-drift). Needs PREFECT_API_URL."""
        from covid_cxr.console import fail

        if not webhook.startswith(("http://", "https://")):
            fail(f"--webhook {webhook}: give an http(s) URL")
        try:
            ids = setup_alerts(Paths().root, webhook)
        except (KeyError, OSError) as e:
            fail(str(e))
        typer.echo(f"block {BLOCK} -> {webhook}; automation {AUTOMATION} ({ids['automation']}): "
                   "a monitor run that ends in Drift now notifies it")
