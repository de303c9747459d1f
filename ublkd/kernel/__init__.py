"""The kernel interface: ublk ABI (uapi), io_uring (uring), control commands (control)."""
