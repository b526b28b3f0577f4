"""The rider's side: the cabinet's kiosk page, its dynamic QR code and its voice.

Only ``challenges`` and ``catalogue``/``view`` are imported by the daemon with the
display off (they use the standard library alone); ``server`` pulls in h11 and segno
(``http_server``, ``qr_code``) and is imported only when ``[display] enabled = true``.
"""
