"""Notifications of a referral's progress: topic-based Subscriptions (FHIR R4 Subscriptions
Backport IG 1.1.0) with the rest-hook channel, and Task status writes to partners' own EHRs.

May import: `store`, `jobs`, `security`, `intake.hosted`, `reports.delivery` (the destination's
FHIR client), `connectors`, `settings`.
"""
