"""Pure rules with one home each: no database, no files, no network.

- :mod:`.identifiers`: the public transaction ID, AE titles, link tokens (UIDs:
  :mod:`iepnode.archive.uids`).
- :mod:`.text`: control characters, email addresses, mobile numbers.

Other rules live in the module of their area: password policy and hashing in
:mod:`iepnode.people.passwords`, audit EventIDs in :mod:`iepnode.people.audit`,
expiry in :mod:`iepnode.sharing.transactions`, archive limits in
:mod:`iepnode.archive.limits`, the data-dir layout in :class:`config.settings.Layout`.
``config`` imports nothing of the project, so it keeps mirrors of the AE-title and
control-character patterns; ``tests/test_rules.py`` checks that they are the same.
"""
