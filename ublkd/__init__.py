"""ublkd: Linux ublk block devices served from Python, kept alive across daemon crashes."""

__version__ = "0.1.0"
