"""Case bundle: normalising everything stored for a case with the pure mappers, assembling the
one Bundle reviewers pull, and the offline `map` of files.

May import: `store`, `jobs`, `intake.hosted`, `mappers`. Assembly (`assemble`) is pure.
"""
