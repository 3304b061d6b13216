"""Intake: referrals pushed to `/fhir` (transaction or single POSTs), the Task state machine, the
resources we host, and inbound validation.

May import: `store`, `jobs`, `security`, `casebundle` (to queue normalisation), `mappers`,
`notify.subscriptions` (a Task move queues its notifications).
"""
