"""The HTTP edge: the aiohttp application. Imports ``iepnode``; never ``scp``.

- :mod:`web.app`: ``create_app``, the application factory;
- :mod:`web.routes`: every URL in one table (method, path, view, name);
- :mod:`web.middlewares`: every middleware (proxies, headers, errors, sessions, upload
  limit, CSRF); :mod:`web.templating`: the Jinja2 environment; :mod:`web.keys`: the
  typed application keys; :mod:`web.connections`: the connection limits of a worker;
- views by area: recipients (:mod:`web.recipient`, :mod:`web.download`,
  :mod:`web.forward`, :mod:`web.upload`), the viewer and reports (:mod:`web.viewer`,
  :mod:`web.reports`), DICOMweb (:mod:`web.dicomweb`, :mod:`web.dicomweb_pages`), staff
  (:mod:`web.admin`, :mod:`web.admin_transactions`, :mod:`web.admin_aes`,
  :mod:`web.admin_users`, :mod:`web.admin_audit`, :mod:`web.admin_requests`,
  :mod:`web.uploads_admin`) on the base in :mod:`web.staff_pages`; :mod:`web.health`.
"""
