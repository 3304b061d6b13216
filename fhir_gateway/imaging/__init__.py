"""Imaging: which studies a case needs, the `pull_imaging` job (DICOMweb, or DIMSE through
Orthanc), and the image store (content-addressed files or Orthanc) behind per-case DICOMweb.

May import: `store`, `jobs`, `metrics`, `security.audit`, `records.partner_clients`, `casebundle`,
`connectors`, `mappers`.
"""
