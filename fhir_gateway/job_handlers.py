"""Every kind of job and the step that handles it: the one place handlers are registered.

A new job is a handler function in its step package and one line here.
"""

from __future__ import annotations

from fhir_gateway import jobs
from fhir_gateway.casebundle import normalise
from fhir_gateway.imaging import job as imaging_job
from fhir_gateway.intake import v2_referrals, v2inbox
from fhir_gateway.intake.tasks import STATUS_KIND as V2_STATUS
from fhir_gateway.notify import channel, subscriptions
from fhir_gateway.records import pull, upload_links
from fhir_gateway.reports import delivery, questions
from fhir_gateway.reports.drafts import DELIVER_REPORT

HANDLERS: dict[str, jobs.Handler] = {
    pull.KIND: pull.run_pull_fhir,
    imaging_job.KIND: imaging_job.run_pull_imaging,
    normalise.KIND: normalise.run_normalise_case,
    upload_links.KIND: upload_links.run_link_studies,
    DELIVER_REPORT: delivery.deliver_report_job,
    v2inbox.KIND: v2inbox.run_route_v2,
    V2_STATUS: v2_referrals.run_send_v2_status,
    questions.SEND_REPLY: questions.send_reply_job,
    subscriptions.HANDSHAKE: channel.run_handshake,
    subscriptions.NOTIFY: channel.run_notify,
    subscriptions.HEARTBEAT: channel.run_heartbeat,
    subscriptions.TASK_UPDATE: channel.run_task_update,
}


def register_all() -> None:
    """Register the service's handlers with the job queue (idempotent)."""
    for kind, handler in HANDLERS.items():
        jobs.register_handler(kind, handler)
