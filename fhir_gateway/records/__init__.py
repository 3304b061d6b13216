"""Records: pulling a patient's records from the partner's EHR (FHIR search, `$everything`) and
the partner HTTP clients (sessions, SMART tokens) that every outbound step shares.

May import: `store`, `jobs`, `metrics`, `security.audit`, `casebundle`, `connectors`, `mappers`.
"""
