"""Case bundle: normalising everything stored for a case with the pure mappers, assembling the
one Bundle reviewers pull, and the offline `map` of files.

May import: `store`, `jobs`, `intake.hosted`, `security.audit`, `mappers`. Assembly (`assemble`)
and the identity rule (`identity`) are pure; `held` keeps what fails the identity check out.
"""
