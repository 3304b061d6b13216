"""Reports: the reviewer's draft, submission, amendment and retraction; the `deliver_report`
job that sends the DiagnosticReport to the treating EHR exactly once; the PDF's fonts.

May import: `store`, `jobs`, `metrics`, `intake`, `security`, `records.partner_clients`,
`casebundle.report_inputs` (the consult question and specimens), `connectors`, `mappers`.
"""
