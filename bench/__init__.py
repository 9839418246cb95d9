"""smtpgate vs Postfix, side by side on loopback: ``python -m bench`` (``make bench``).

See bench/README.md. :mod:`bench.harness` starts the processes (smtp-sink, smtpgate,
a throwaway Postfix) and measures; :mod:`bench.bench` runs the workloads and prints the table.
"""
