"""Mirror by capture: packets in, reassembled client byte streams out.

:mod:`packets` parses IP/TCP headers with ``struct`` (no per-packet dissection
library on the hot path), :mod:`reassembly` rebuilds each connection's
client-to-server bytes and reports gaps, :mod:`pcap` frames records for a pcap
file, :mod:`bpf` compiles the kernel filter once per set of ports. All of them
are free of I/O; :mod:`sniffer` is the thin socket layer.
"""
