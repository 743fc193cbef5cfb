"""Command-line entry points (``compactfusion-xdit``) and the ``--compact-*`` flags they share."""
