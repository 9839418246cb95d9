"""postscreen(8)'s model inside smtpgate: the tests a new client passes before it may mail.

Postfix's postscreen sits in front of smtpd and hands a client's socket to smtpd once the
client passed; smtpgate is both, in one process.  This package is the part without I/O:

* :mod:`~smtpgate.postscreen.config` reads the ``postscreen_*`` parameters into a
  :class:`~smtpgate.postscreen.config.PostscreenConfig` (once per load, file and line
  for every bad value), and decides whether postscreen runs at all (``smtpgate_postscreen``).
* :mod:`~smtpgate.postscreen.dnsbl` parses ``postscreen_dnsbl_sites`` and combines the
  lists' answers into postscreen's score (weights, reply filters, allow lists, TTLs); it
  asks every list at once through the :class:`~smtpgate.policy.ports.Resolver` port.
* :mod:`~smtpgate.postscreen.cache` is the memory of passed tests (postscreen's cache
  record, ``pregreet;dnsbl;pipelining;non_smtp;bare_newline`` expiry times) behind the
  :class:`~smtpgate.postscreen.cache.PassCache` port, with an in-memory implementation.
* :mod:`~smtpgate.postscreen.screen` is one client's screening: the access list, the
  cache, the verdict after the greet wait, the deep protocol tests the SMTP machine
  asks about, and postscreen's log lines (``CONNECT from``, ``PASS NEW``, ``DNSBL rank``,
  ``PREGREET``, ...), written to a log sink named ``postfix/postscreen``.

The waiting (the greet wait, the PREGREET peek) is the network adapter's (``smtpd.py``);
the deep tests run inside :class:`~smtpgate.smtp.machine.SmtpMachine`, which gets the
client's :class:`~smtpgate.postscreen.screen.Screening` from its driver.
"""
