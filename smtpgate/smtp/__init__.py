"""SMTP without I/O: the syntax (``syntax.py``), message content (``data.py``) and the state
machine of one connection (``machine.py``), driven by the network adapter (``smtpd.py``)
and by ``explain`` alike."""
