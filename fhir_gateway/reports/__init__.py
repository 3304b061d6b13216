"""Reports: the reviewer's draft, submission, amendment and retraction; the `deliver_report`
job that sends the DiagnosticReport to the treating EHR (and each further recipient) exactly
once; follow-up questions answered as addenda; the PDF's fonts.

May import: `store`, `jobs`, `metrics`, `intake`, `security`, `records.partner_clients`,
`casebundle.report_inputs` (the consult question and specimens), `connectors`, `mappers`.
"""
