"""The reviewer workspace at /app: server-rendered pages (Jinja2, autoescape on, htmx for the
parts that change), sign-in through the organisation's OpenID Connect provider, and the dev
sign-in for the demo.

A page handler does what an API handler does: it authenticates (the session's `Principal`),
calls the step packages (`casebundle`, `reports`, `security.access`, `jobs`) and renders.
May import: the step packages, `security`, `jobs`, `store`, `settings`, `errors`, and
`api.views` (the JSON shapes of a case). Templates receive plain dicts.
"""

import warnings

# authlib 1.7 announces on import that its httpx integration will move to httpx2; that is its
# own business (our sign-in works either way), not something to print to an operator's terminal.
warnings.filterwarnings("ignore", message="The httpx module is deprecated")
