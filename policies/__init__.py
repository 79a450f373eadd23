"""Pure decision code: no I/O. Access policies, approval rules, release checks, the job
lifecycle, and the project's exception tree (:mod:`policies.errors`). Everything a decision
depended on is returned with it so that the caller can record it."""
