"""Intake: referrals pushed to `/fhir` (transaction or single POSTs), the Task state machine, the
resources we host, inbound validation, and HL7 v2 over MLLP (the message inbox, 360X
referrals and their OSU^O51 status messages).

May import: `store`, `jobs`, `security`, `casebundle` (to queue normalisation), `mappers`,
`connectors` (MLLP, in the v2 jobs and the listener's store callback),
`notify.subscriptions` (a Task move queues its notifications).
"""
